"""How a sweep's jobs are named: the W&B group, job type and tags, folder names, the config resolvers."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Sequence

from omegaconf import OmegaConf

from sparsebench.prune.config import prunes
from sparsebench.rundir import job_method

if TYPE_CHECKING:  # annotations only: no import at run time
    from sparsebench.config import Config

# Overrides that say where files go, not what the job is: no use as W&B tags.
_NOT_TAGS = ("hydra.", "trainer.init_from", "trainer.resume", "trainer.progress", "logger.")
_WANDB_TAG_MAX = 64  # W&B rejects longer tags


def register_resolvers() -> None:
    """``${sparsebench_gpus:N}``: the number of visible GPUs, or N without one;
    ``${sparsebench_dirname:NAME}``: NAME made safe as one path component."""
    if not OmegaConf.has_resolver("sparsebench_gpus"):
        OmegaConf.register_new_resolver("sparsebench_gpus", _visible_gpus)
    if not OmegaConf.has_resolver("sparsebench_dirname"):
        OmegaConf.register_new_resolver("sparsebench_dirname", job_dirname)


def job_dirname(name: str, limit: int = 200) -> str:
    """A sweep job's folder name: its overrides, cut with a hash when long. File systems
    refuse names over 255 bytes, and a sweep with many fixed overrides reaches that."""
    name = str(name).replace("/", "_")
    if len(name) <= limit:
        return name
    return f"{name[: limit - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def _visible_gpus(fallback: int = 1) -> int:
    import torch  # late: only a launcher config asks

    return torch.cuda.device_count() or int(fallback)


def job_type(cfg: Config) -> str:
    """What the job does to the model, e.g. "dense", "agp", "linear", "agp+linear"."""
    return job_method(cfg.prune.method if prunes(cfg.prune) else "none", cfg.quant.method)


def override_tags(overrides: Sequence[str]) -> List[str]:
    """The job's overrides as W&B tags ("prune.final_sparsity=0.9"), minus paths and logger settings."""
    tags = [o.lstrip("+~") for o in overrides if not o.lstrip("+~").startswith(_NOT_TAGS)]
    return [t[:_WANDB_TAG_MAX] for t in tags]


def job_defaults(cfg: Config, overrides: Sequence[str], sweep_dir: Optional[Path]) -> None:
    """Fill logger.group / job_type / tags where the user left them empty.

    A single run is grouped by its experiment's name; the jobs of a multirun (``sweep_dir`` given) share
    one group, the experiment's name and the sweep's folder ("paper_vgg16_cifar10/2026-12-07_08-00-00"),
    so W&B shows the sweep as one group and its study beside the others. Tags are the job's overrides.
    """
    lg = cfg.logger
    if not lg.group:
        lg.group = f"{cfg.name}/{Path(sweep_dir).name}" if sweep_dir is not None else cfg.name
    if not lg.job_type:
        lg.job_type = job_type(cfg)
    if not lg.tags:
        lg.tags = override_tags(overrides)
