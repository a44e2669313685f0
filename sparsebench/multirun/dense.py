"""One dense pre-training for a whole sweep (``trainer.init_from=shared``).

Jobs that differ only in how they compress share one dense model per dense setting (data,
model, dense trainer settings, seed): the first job that needs it trains it into
``<sweep_dir>/dense-<key>/`` (a run directory like any other, so the report shows it as the
uncompressed reference) while the others wait on a lock file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict

from omegaconf import OmegaConf

from sparsebench.multirun.relaunch import without_added_defaults
from sparsebench.prune.config import PruneConfig
from sparsebench.quant.config import QuantConfig
from sparsebench.rundir import DENSE, DENSE_DIR_PREFIX, checkpoint_path

if TYPE_CHECKING:  # annotations only: no import at run time
    from sparsebench.config import Config

log = logging.getLogger("sparsebench")

SHARED = "shared"
# Trainer keys that only matter after dense training, or only for how fast it runs (compile,
# threads): jobs differing in them share one dense model.
_NOT_DENSE = (
    "finetune_epochs",
    "finetune_lr",
    "distill",
    "distill_temperature",
    "teacher",
    "init_from",
    "resume",
    "progress",
    "checkpoint_every",
    "checkpoint_epochs",
    "eval_every",
    "compile",
    "compile_mode",
    "cpu_threads",
)


def dense_key(cfg: Config) -> str:
    """A short hash of everything that shapes the dense model (data, model, dense trainer settings, seed).
    Compile settings are left out: the shared model is trained in the mode of the job that gets
    to it first, which its dense-<key>/manifest.json records."""
    facts = {
        group: without_added_defaults(OmegaConf.to_container(cfg[group], resolve=True), group)
        for group in ("data", "model", "trainer")
    }
    facts["trainer"] = {k: v for k, v in facts["trainer"].items() if k not in _NOT_DENSE}
    facts["seed"] = cfg.seed
    return hashlib.sha1(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def dense_config(cfg: Config) -> Any:
    """The job's config with pruning, quantization and the benchmark off: its dense pre-training alone."""
    dense = cfg.copy()
    dense.prune = PruneConfig()
    dense.quant = QuantConfig()
    dense.trainer.finetune_epochs = 0
    dense.trainer.distill = 0.0
    dense.trainer.teacher = None
    dense.trainer.init_from = None
    if "enabled" in dense.bench:
        dense.bench.enabled = False
    dense.logger.job_type = "dense-pretrain"
    dense.logger.tags = [f"dense={dense_key(cfg)}"]
    return dense


def shared_dense(cfg: Config, sweep_dir: Path, run: Callable[..., Dict[str, Any]]) -> str:
    """Path of the sweep's dense.pt for this job's dense settings; the first job that asks trains it.

    The dense run lives in ``<sweep_dir>/dense-<key>/`` (a run directory like any other, so the
    report shows it as the uncompressed reference). A lock file makes jobs that run at once
    wait for the one that trains instead of training the same model again.
    """
    key = dense_key(cfg)
    run_dir = Path(sweep_dir) / f"{DENSE_DIR_PREFIX}{key}"
    target = run_dir / DENSE
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(sweep_dir) / f".{DENSE_DIR_PREFIX}{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when this process dies
        if not target.exists():
            dense = dense_config(cfg)
            dense.trainer.resume = bool(cfg.trainer.resume) and checkpoint_path(run_dir).exists()
            log.info("%s the shared dense model in %s", "resuming" if dense.trainer.resume else "training", run_dir)
            metrics = run(dense, run_dir, [f"dense_key={key}"])
            if metrics.get("status") != "ok" or not target.exists():
                raise RuntimeError(f"the shared dense pre-training in {run_dir} failed; see its metrics.json")
    return str(target)
