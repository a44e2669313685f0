"""Relaunching into a run directory: a sweep continued where it stopped, or one run resumed.

``trainer.resume=true`` on a sweep continues it (after a crash, a time limit): a job that finished
is kept as it is, one with a checkpoint resumes from it, the others start afresh. Either way the
relaunch must compute what the first launch computed: a changed key (beyond those free to change)
is refused in one line naming it, and so is a run whose recorded config cannot be read.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional

from omegaconf import OmegaConf

from sparsebench.errors import ConfigError
from sparsebench.rundir import MANIFEST, METRICS, Unreadable, checkpoint_path, metrics_or_empty, read_json, write_json

if TYPE_CHECKING:  # annotations only: no import at run time
    from sparsebench.config import Config

log = logging.getLogger("sparsebench")

# Keys added since sweeps became resumable, with the value that computes what a config did before
# they existed: at that value they are left out of the dense key and of the relaunch check, so a
# sweep folder from before them keeps its dense model and finished jobs.
ADDED_AT_DEFAULT = {
    "data.trivialaugment": False,
    "trainer.ema_decay": None,
    "prune.regrow_until": None,
    "prune.regrow_fraction": 0.3,
    "trainer.distill": 0.0,
    "trainer.distill_temperature": 4.0,
    "quant.kmeans_per_channel": False,
    "trainer.teacher": None,
    "data.drop_last": False,
    "data.val_fraction": 0.0,
    "data.train": None,
    "data.test": None,
    "data.val": None,
    "data.workers": 4,
    "model._target_": None,
    "model.kwargs": {},
    "quant.unit": "epoch",
    "prune.types": [],
}
# Keys a relaunch may change without changing what a job computes (init_from: "shared" before the
# dense model's path is filled in; logger: tags name the overrides, resume among them; eval_every:
# only how often the test set is scored).
_RELAUNCH_FREE = (
    "trainer.resume",
    "trainer.progress",
    "trainer.init_from",
    "trainer.eval_every",
    "bench.progress",
    "logger.",
)


def without_added_defaults(flat: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``flat`` (keys under ``prefix``) less the keys of ADDED_AT_DEFAULT that hold their old-behaviour value."""
    dot = f"{prefix}." if prefix else ""
    return {
        k: v for k, v in flat.items() if not (f"{dot}{k}" in ADDED_AT_DEFAULT and v == ADDED_AT_DEFAULT[f"{dot}{k}"])
    }


def check_relaunch(cfg: Config, run_dir: Path, new_dir_key: str) -> bool:
    """A relaunch into ``run_dir``: whether it ran there before (it has a manifest). If it ran with
    another config than ``cfg`` (beyond the keys free to change), a ConfigError naming the first one:
    keeping or resuming that run would mix two recipes (say, weights pruned under one ceiling,
    retrained under another). ``new_dir_key``: the setting that gives the changed config a folder."""
    run_dir = Path(run_dir)
    earlier = recorded_config(run_dir)
    if earlier is None:
        if checkpoint_path(run_dir).exists():  # it ran here, but nothing says with which config
            raise ConfigError(
                f"trainer.resume=true: {run_dir} has a checkpoint but no {MANIFEST} to show the config "
                f"it ran with; without it a resume could mix two recipes: give a new {new_dir_key}"
            )
        return False  # never started here
    now = without_added_defaults(_flat(OmegaConf.to_container(cfg, resolve=True)))
    then = without_added_defaults(_flat(earlier))
    changed = sorted(
        k for k in now.keys() | then.keys() if now.get(k) != then.get(k) and not k.startswith(_RELAUNCH_FREE)
    )
    if changed:
        k = changed[0]
        raise ConfigError(
            f"trainer.resume=true: {run_dir} ran with {k}={then.get(k)!r}, this launch has "
            f"{k}={now.get(k)!r}; give a new {new_dir_key} to run the changed config"
        )
    return True


def recorded_config(run_dir: Path) -> Optional[Dict[str, Any]]:
    """The config a run recorded in its manifest; None if it has none, a ConfigError if it cannot be read."""
    try:
        manifest = read_json(Path(run_dir) / MANIFEST)
    except Unreadable as e:
        raise ConfigError(f"trainer.resume=true: {e}; the config this run started with cannot be checked") from None
    if manifest is None:
        return None
    if not isinstance(manifest.get("config"), dict):
        raise ConfigError(
            f"trainer.resume=true: {run_dir / MANIFEST} holds no config; the config this run started "
            "with cannot be checked"
        )
    return manifest["config"]


def finished_job(cfg: Config, run_dir: Path) -> Optional[Dict[str, Any]]:
    """The metrics of this job from an earlier launch of the sweep if it finished there, else None.
    An earlier launch with another config (the experiment's YAML changed since) is a ConfigError."""
    if not check_relaunch(cfg, run_dir, "hydra.sweep.dir"):
        return None
    metrics = metrics_or_empty(run_dir)
    return metrics if metrics.get("status") == "ok" else None


def resume_or_start(cfg: Config, run_dir: Path, job_num: int) -> None:
    """A job of a resumed sweep without a checkpoint of its own starts from the beginning."""
    if not checkpoint_path(run_dir).exists():
        log.info("job %s has no checkpoint in %s: it starts from the beginning", job_num, run_dir)
        cfg.trainer.resume = False


def _flat(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}


def record_failure(run_dir: Path, error: BaseException) -> None:
    """metrics.json for a job that failed before experiment.run could write one (over a failure of
    an earlier launch of the sweep, never over a finished job's)."""
    if metrics_or_empty(run_dir).get("status") != "ok":
        write_json(Path(run_dir) / METRICS, {"status": "failed", "error": f"{type(error).__name__}: {error}"})
