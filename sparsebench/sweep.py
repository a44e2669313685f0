"""Multirun wiring: per-job W&B defaults, one GPU per concurrent job, and the end-of-sweep report.

Hydra runs each job of ``sparsebench -m ...`` through the launcher (in this process, in
joblib workers or as SLURM jobs); ``__main__`` calls ``job_defaults`` and ``claim_gpu`` inside
the job, and Hydra calls ``SweepReport`` in the launching process once every job has ended.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from sparsebench.errors import ConfigError
from sparsebench.track import last_checkpoint

log = logging.getLogger("sparsebench")

# Overrides that say where files go, not what the job is: no use as W&B tags.
_NOT_TAGS = ("hydra.", "trainer.init_from", "trainer.resume", "trainer.progress", "logger.")
_WANDB_TAG_MAX = 64  # W&B rejects longer tags

# `trainer.init_from=shared`: every job of the sweep starts from one dense model per dense setting.
SHARED = "shared"
# Trainer keys that only matter after dense training, or only for how fast it runs (compile,
# threads): jobs differing in them share one dense model.
_NOT_DENSE = ("finetune_epochs", "finetune_lr", "distill", "distill_temperature", "teacher", "init_from", "resume",
              "progress", "checkpoint_every", "checkpoint_epochs", "eval_every", "compile", "compile_mode", "cpu_threads")

# Keys added since sweeps became resumable, with the value that computes what a config did before
# they existed: at that value they are left out of the dense key and of the relaunch check, so a
# sweep folder from before them keeps its dense model and finished jobs.
_ADDED_AT_DEFAULT = {"data.trivialaugment": False, "trainer.ema_decay": None,
                     "prune.regrow_until": None, "prune.regrow_fraction": 0.3,
                     "trainer.distill": 0.0, "trainer.distill_temperature": 4.0,
                     "quant.kmeans_per_channel": False, "trainer.teacher": None, "data.drop_last": False}

# Set by SweepReport in the launching process; __main__ turns failures into the exit code.
LAST_SWEEP: Dict[str, Any] = {}


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


def job_type(cfg: Any) -> str:
    """What the job does to the model, e.g. "dense", "agp", "linear", "agp+linear"."""
    from sparsebench.prune.config import prunes

    parts = [m for m in (cfg.prune.method if prunes(cfg.prune) else "none", cfg.quant.method) if m != "none"]
    return "+".join(parts) or "dense"


def override_tags(overrides: Sequence[str]) -> List[str]:
    """The job's overrides as W&B tags ("prune.final_sparsity=0.9"), minus paths and logger settings."""
    tags = [o.lstrip("+~") for o in overrides if not o.lstrip("+~").startswith(_NOT_TAGS)]
    return [t[:_WANDB_TAG_MAX] for t in tags]


def job_defaults(cfg: Any, overrides: Sequence[str], sweep_dir: Optional[Path]) -> None:
    """Fill logger.group / job_type / tags where the user left them empty.

    In a multirun (``sweep_dir`` given) every job of the sweep shares the group named after the
    sweep directory, so W&B shows the sweep as one group; tags are the job's own overrides.
    """
    lg = cfg.logger
    if sweep_dir is not None and not lg.group:
        lg.group = Path(sweep_dir).name
    if not lg.job_type:
        lg.job_type = job_type(cfg)
    if sweep_dir is not None and not lg.tags:
        lg.tags = override_tags(overrides)


@contextmanager
def claim_gpu(n_gpus: int, job_num: int, lock_dir: Optional[Path] = None) -> Iterator[Optional[int]]:
    """Hold one GPU index for the duration of a job, or yield None when there is nothing to choose.

    Jobs running at once on one host (joblib workers) each take the first free GPU, starting at
    ``job_num % n_gpus`` so that a serial sweep spreads too. "Free" is an exclusive ``flock`` on
    a per-GPU lock file: the kernel releases it when the job ends or its process dies, so a
    crashed job never leaves a GPU claimed. With every GPU taken, jobs share ``job_num % n_gpus``.
    """
    if n_gpus <= 1:
        yield 0 if n_gpus == 1 else None
        return
    lock_dir = Path(lock_dir or Path(tempfile.gettempdir()) / f"sparsebench-gpus-{os.getuid()}")
    lock_dir.mkdir(parents=True, exist_ok=True)
    first = job_num % n_gpus
    for gpu in [(first + i) % n_gpus for i in range(n_gpus)]:
        f = open(lock_dir / f"gpu{gpu}.lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        try:
            yield gpu
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()
        return
    log.warning("all %d GPUs are taken by other jobs; job %d shares GPU %d", n_gpus, job_num, first)
    yield first


def dense_key(cfg: Any) -> str:
    """A short hash of everything that shapes the dense model (data, model, dense trainer settings, seed).
    Compile settings are left out: the shared model is trained in the mode of the job that gets
    to it first, which its dense-<key>/manifest.json records."""
    facts = {group: _without_added_defaults(OmegaConf.to_container(cfg[group], resolve=True), group)
             for group in ("data", "model", "trainer")}
    facts["trainer"] = {k: v for k, v in facts["trainer"].items() if k not in _NOT_DENSE}
    facts["seed"] = cfg.seed
    return hashlib.sha1(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _without_added_defaults(flat: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``flat`` (keys under ``prefix``) less the keys of _ADDED_AT_DEFAULT that hold their old-behaviour value."""
    dot = f"{prefix}." if prefix else ""
    return {k: v for k, v in flat.items()
            if not (f"{dot}{k}" in _ADDED_AT_DEFAULT and v == _ADDED_AT_DEFAULT[f"{dot}{k}"])}


def dense_config(cfg: Any) -> Any:
    """The job's config with pruning, quantization and the benchmark off: its dense pre-training alone."""
    from sparsebench.prune.config import PruneConfig
    from sparsebench.quant.config import QuantConfig

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


# ``trainer.resume=true`` on a sweep continues it where it stopped (a crash, a time limit): a job
# that finished is kept as it is, one with a checkpoint resumes from it, the others start afresh.
# A single run resumed from the CLI is held to the same check (check_relaunch).
# Keys a relaunch may change without changing what a job computes (init_from: "shared" before the
# dense model's path is filled in; logger: tags name the overrides, resume among them; eval_every:
# only how often the test set is scored).
_RELAUNCH_FREE = ("trainer.resume", "trainer.progress", "trainer.init_from", "trainer.eval_every", "bench.progress",
                  "logger.")


def check_relaunch(cfg: Any, run_dir: Path, new_dir_key: str) -> bool:
    """A relaunch into ``run_dir``: whether it ran there before (it has a manifest). If it ran with
    another config than ``cfg`` (beyond the keys free to change), a ConfigError naming the first one:
    keeping or resuming that run would mix two recipes (say, weights pruned under one ceiling,
    retrained under another). ``new_dir_key``: the setting that gives the changed config a folder."""
    run_dir = Path(run_dir)
    try:
        earlier = json.loads((run_dir / "manifest.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        return False  # never started here
    now = _without_added_defaults(_flat(OmegaConf.to_container(cfg, resolve=True)))
    then = _without_added_defaults(_flat(earlier))
    changed = sorted(k for k in now.keys() | then.keys()
                     if now.get(k) != then.get(k) and not k.startswith(_RELAUNCH_FREE))
    if changed:
        k = changed[0]
        raise ConfigError(f"trainer.resume=true: {run_dir} ran with {k}={then.get(k)!r}, this launch has "
                          f"{k}={now.get(k)!r}; give a new {new_dir_key} to run the changed config")
    return True


def finished_job(cfg: Any, run_dir: Path) -> Optional[Dict[str, Any]]:
    """The metrics of this job from an earlier launch of the sweep if it finished there, else None.
    An earlier launch with another config (the experiment's YAML changed since) is a ConfigError."""
    if not check_relaunch(cfg, run_dir, "hydra.sweep.dir"):
        return None
    metrics = _metrics(Path(run_dir))
    return metrics if metrics.get("status") == "ok" else None


def resume_or_start(cfg: Any, run_dir: Path, job_num: int) -> None:
    """A job of a resumed sweep without a checkpoint of its own starts from the beginning."""
    if not last_checkpoint(run_dir).exists():
        log.info("job %s has no checkpoint in %s: it starts from the beginning", job_num, run_dir)
        cfg.trainer.resume = False


def _metrics(run_dir: Path) -> Dict[str, Any]:
    """A job folder's metrics.json; empty when it has none (or only part of one)."""
    try:
        return json.loads((Path(run_dir) / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}


def _flat(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}


DENSE_DIR_PREFIX = "dense-"  # <sweep_dir>/dense-<key>/: the sweep's shared dense run, not one of its jobs


def is_shared_dense(job_dir_name: str) -> bool:
    return job_dir_name.startswith(DENSE_DIR_PREFIX)


def shared_dense(cfg: Any, sweep_dir: Path, run: Callable[..., Dict[str, Any]]) -> str:
    """Path of the sweep's dense.pt for this job's dense settings; the first job that asks trains it.

    The dense run lives in ``<sweep_dir>/dense-<key>/`` (a run directory like any other, so the
    report shows it as the uncompressed reference). A lock file makes jobs that run at once
    wait for the one that trains instead of training the same model again.
    """
    key = dense_key(cfg)
    run_dir = Path(sweep_dir) / f"{DENSE_DIR_PREFIX}{key}"
    target = run_dir / "dense.pt"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(sweep_dir) / f".{DENSE_DIR_PREFIX}{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when this process dies
        if not target.exists():
            dense = dense_config(cfg)
            dense.trainer.resume = bool(cfg.trainer.resume) and last_checkpoint(run_dir).exists()
            log.info("%s the shared dense model in %s", "resuming" if dense.trainer.resume else "training", run_dir)
            metrics = run(dense, run_dir, [f"dense_key={key}"])
            if metrics.get("status") != "ok" or not target.exists():
                raise RuntimeError(f"the shared dense pre-training in {run_dir} failed; see its metrics.json")
    return str(target)


def record_failure(run_dir: Path, error: BaseException) -> None:
    """metrics.json for a job that failed before experiment.run could write one (over a failure of
    an earlier launch of the sweep, never over a finished job's)."""
    from sparsebench.track import write_json

    if _metrics(run_dir).get("status") != "ok":
        write_json(Path(run_dir) / "metrics.json", {"status": "failed", "error": f"{type(error).__name__}: {error}"})


def own_jobs(rows: Sequence[Dict[str, Any]], task_overrides: Sequence[str],
             sweeper_params: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """The report rows of the jobs this sweep launched, and the shared dense models in the folder.

    Sweeps may share a folder (and its dense model). A job is this sweep's when its recorded
    overrides are one of the combinations this sweep gives its jobs: its command line, after
    `hydra.sweeper.params` for the keys the command line leaves alone, written as Hydra's basic
    sweeper writes each job's `overrides.yaml`. Another sweep's job, finished or still running,
    differs in a key or a value. A job without recorded overrides counts as this sweep's.
    """
    parser = OverridesParser.create()
    lines = [f"{k}={v}" for k, v in (sweeper_params or {}).items()] + list(task_overrides)
    allowed: Dict[str, Optional[set]] = {}  # None: any value (an interval, a glob)
    for o in parser.parse_overrides(lines):  # the command line comes last and wins, as in the sweeper
        key = o.get_key_element()
        try:
            values = o.sweep_string_iterator() if o.is_sweep_override() else [o.get_value_element_as_str()]
            allowed[key] = {f"{key}={v}" for v in values}
        except HydraException:
            allowed[key] = None
    mine = []
    for row in rows:
        recorded = row.get("_overrides") or []
        try:
            ran = {parser.parse_override(line).get_key_element(): line for line in recorded}
        except HydraException:
            ran = {}
        if (is_shared_dense(row["job"]) or not ran
                or (set(ran) == set(allowed) and all(v is None or ran[k] in v for k, v in allowed.items()))):
            mine.append(row)
    return mine


class SweepReport(Callback):
    """At the end of a multirun: write summary.csv + report.html and count the failed jobs."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from sparsebench import report  # late: matplotlib is only needed here

        sweep_dir = Path(str(config.hydra.sweep.dir))
        rows = report.collect(sweep_dir)  # the report covers the folder: every sweep that wrote into it
        params = OmegaConf.select(config, "hydra.sweeper.params")
        try:
            mine = own_jobs(rows, list(config.hydra.overrides.task), OmegaConf.to_container(params) if params else None)
        except Exception as e:  # Hydra turns a callback's exception into a warning: count every job instead
            log.error("sweep: could not tell this sweep's jobs from others' (%s: %s); counting all", type(e).__name__, e)
            mine = rows
        if len(mine) < len(rows):
            log.info("sweep: %d of the %d jobs in %s are another sweep's (other values); not counted here",
                     len(rows) - len(mine), len(rows), sweep_dir)
        failed = [str(r["num"] if r["num"] is not None else r["job"])  # by job number (the report orders by values)
                  for r in sorted(mine, key=lambda r: (r["num"] is None, r["num"] or 0)) if r["status"] != "ok"]
        LAST_SWEEP.update(dir=str(sweep_dir), jobs=len(mine), failed=failed)
        if self.enabled and rows:
            try:
                report.write_report(sweep_dir, rows)
            except Exception as e:  # a plotting problem must not hide the sweep's own outcome
                log.error("could not write the sweep report: %s: %s", type(e).__name__, e)
        where = f"{sweep_dir}/summary.csv" if self.enabled else str(sweep_dir)
        if failed:
            print(f"sweep: {len(failed)} of {len(mine)} jobs failed (job {', '.join(failed)}); see {where}",
                  file=sys.stderr)
        else:
            log.info("sweep: all %d jobs ok; see %s", len(mine), where)
