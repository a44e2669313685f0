"""Where results go: the run's manifest and metrics files, and W&B (offline by default).

``envelope`` is what every run of every app is wrapped in: manifest.json when it starts, the
tracker, and metrics.json (status "ok" or "failed", runtime) written whatever happens."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence

from sparsebench.rundir import HISTORY, MANIFEST, METRICS, WANDB_ID, write_json

if TYPE_CHECKING:  # annotations only: no import at run time
    from sparsebench.config import LoggerConfig

PACKAGE_DIR = Path(__file__).resolve().parent


def git_state() -> Dict[str, Any]:
    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", *args], cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_sha": sha, "git_dirty": bool(dirty) if sha else None}


def kernel_build_id() -> Optional[Any]:
    try:
        from sparsebench import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C.build_info() if hasattr(_C, "build_info") else "unknown"


def environment() -> Dict[str, Any]:
    import torch  # late: the file helpers above (and sparsebench-report) need no torch

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "host": platform.node(),
        "kernel_build": kernel_build_id(),
    }


def write_manifest(run_dir: Path, config: Dict[str, Any], seed: int, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    manifest = {
        "config": config,
        "overrides": list(overrides),
        "seed": seed,
        "argv": sys.argv,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **git_state(),
        **environment(),
    }
    write_json(Path(run_dir) / MANIFEST, manifest)
    return manifest


# ---------------------------------------------------------------- trackers


class Tracker:
    """No-op tracker (logger=none); the W&B one overrides these."""

    def log(self, metrics: Dict[str, float], step: int) -> None:
        pass

    def summary(self, metrics: Dict[str, Any]) -> None:
        pass

    def table(self, name: str, rows: Sequence[Dict[str, Any]]) -> None:
        pass

    def artifact(self, path: Path, name: str, kind: str) -> None:
        """Keep the file ``path`` with the run (W&B: an artifact ``name`` of type ``kind``, versioned)."""

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker(Tracker):
    """One W&B run per run directory: its id is kept there, so a resumed run continues the same W&B run."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: Dict[str, Any], name: str, resume: bool = False):
        import wandb  # optional: only logger=wandb needs it

        self.wandb, self.artifacts = wandb, cfg.artifacts
        id_file = Path(run_dir) / WANDB_ID
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            mode=cfg.mode,
            dir=str(run_dir),
            name=name,
            group=cfg.group,
            job_type=cfg.job_type,
            tags=list(cfg.tags),
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
            reinit="finish_previous",  # one W&B run per job, also in a multirun process
            settings=wandb.Settings(console="off", silent=True),
        )
        if run_id is None:
            id_file.write_text(self.run.id + "\n")
        # Final numbers in the runs table without custom panels (a sweep's table: one row a job).
        for key in (
            "acc_dense",
            "acc_final",
            "acc_val_dense",
            "acc_val_final",
            "sparsity",
            "weight_bits",
            "compression",
            "footprint_bytes",
            "macs_kept",
            "speedup/*",
        ):
            self.run.define_metric(key, summary="last")

    def log(self, metrics: Dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, metrics: Dict[str, Any]) -> None:
        for key, value in metrics.items():
            self.run.summary[key] = value

    def table(self, name: str, rows: Sequence[Dict[str, Any]]) -> None:
        if rows:
            columns = list(rows[0])
            self.run.log({name: self.wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})

    def artifact(self, path: Path, name: str, kind: str) -> None:
        if not self.artifacts:
            return
        art = self.wandb.Artifact(name, type=kind)
        art.add_file(str(path))
        self.run.log_artifact(art)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


class HistoryFile(Tracker):
    """Every logged metrics dict as one JSON line of ``history.jsonl``, whatever the logger, then
    on to ``inner``: the learning curves of a run without W&B (e.g. on a machine without it).

    Flushed line by line. Several lines may share a step (the loss and the epoch's metrics):
    merge them per step. A resumed run (``append``) adds to the file, so the steps between its
    last checkpoint and the crash appear twice: the later line of a key wins."""

    def __init__(self, path: Path, inner: Tracker, append: bool = False):
        self.path, self.inner, self.mode = path, inner, "a" if append else "w"
        self.file: Optional[Any] = None  # opened by the first log (a run that logs nothing gets no file)

    def log(self, metrics: Dict[str, float], step: int) -> None:
        self.file = self.file or open(self.path, self.mode)
        self.file.write(json.dumps({"step": step, **metrics}, default=str) + "\n")
        self.file.flush()
        self.inner.log(metrics, step)

    def summary(self, metrics: Dict[str, Any]) -> None:
        self.inner.summary(metrics)

    def table(self, name: str, rows: Sequence[Dict[str, Any]]) -> None:
        self.inner.table(name, rows)

    def artifact(self, path: Path, name: str, kind: str) -> None:
        self.inner.artifact(path, name, kind)

    def finish(self, exit_code: int = 0) -> None:
        if self.file is not None:
            self.file.close()
        self.inner.finish(exit_code)


def make_tracker(cfg: LoggerConfig, run_dir: Path, config: Dict[str, Any], name: str, resume: bool = False) -> Tracker:
    wandb = cfg.name == "wandb" and cfg.mode != "disabled"
    inner = WandbTracker(cfg, run_dir, config, name, resume) if wandb else Tracker()
    return HistoryFile(Path(run_dir) / HISTORY, inner, append=resume)


class Run:
    """A run in its envelope: ``metrics`` (written to metrics.json at the end) and ``tracker``."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.metrics: Dict[str, Any] = {"status": "failed"}
        self.tracker: Tracker = Tracker()

    def start(
        self,
        config: Dict[str, Any],
        seed: int,
        overrides: Sequence[str],
        logger_cfg: LoggerConfig,
        name: str,
        resume: bool = False,
    ) -> None:
        """Write the manifest and open the tracker (after the config is validated)."""
        write_manifest(self.run_dir, config, seed, overrides)
        self.tracker = make_tracker(logger_cfg, self.run_dir, config, name=name, resume=resume)


@contextmanager
def envelope(run_dir: Path) -> Iterator[Run]:
    """Wrap a run: whatever happens inside, metrics.json gets its status, error and runtime_s."""
    started = time.time()
    run = Run(run_dir)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    exit_code = 1
    try:
        yield run
        run.metrics["status"] = "ok"
        exit_code = 0
    except BaseException as e:
        run.metrics["status"] = "failed"
        run.metrics["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        run.metrics["runtime_s"] = round(time.time() - started, 3)
        write_json(run.run_dir / METRICS, run.metrics)
        run.tracker.summary(run.metrics)
        run.tracker.finish(exit_code)


def result_lines(metrics: Dict[str, Any], run_dir: Path) -> List[str]:
    """What a finished run found, for the console: accuracy, sparsity and bits, size, speed, where it is."""
    lines = [f"sparsebench: {metrics.get('status', '?')} in {metrics.get('runtime_s', 0):.1f} s -> {run_dir}"]
    dense, final = metrics.get("acc_dense"), metrics.get("acc_final")
    if dense is not None and final is not None:
        lines.append(
            f"  accuracy  dense {100 * dense:.2f}% -> final {100 * final:.2f}% ({100 * (final - dense):+.2f} point) "
            "on the test set"
        )
        val_dense, val_final = metrics.get("acc_val_dense"), metrics.get("acc_val_final")
        if val_dense is not None and val_final is not None:
            lines.append(
                f"            dense {100 * val_dense:.2f}% -> final {100 * val_final:.2f}% on the validation split"
            )
    if metrics.get("sparsity") is not None:
        kept = metrics.get("macs_kept")
        lines.append(
            f"  sparsity  {100 * metrics['sparsity']:.1f}% of the pruned layers' weights, "
            f"{metrics.get('weight_bits')}-bit weights"
            + (f", {100 * kept:.1f}% of the multiply-adds kept" if kept is not None else "")
        )
    if metrics.get("footprint_bytes"):
        lines.append(
            f"  size      {metrics['footprint_bytes'] / 1e6:.3f} MB packed, "
            f"{metrics.get('compression', 1):.1f}x smaller than the fp32 dense weights"
        )
    speedups = sorted(k for k in metrics if k.startswith("speedup/"))
    if speedups:
        cells = [f"{k.split('/')[1]} {k.split('/')[2]} {metrics[k]:.2f}x" for k in speedups]
        lines.append(f"  speedup   whole network, {metrics.get('bench/backend')} vs " + ", ".join(cells))
    elif metrics.get("status") == "ok":
        lines.append("  speedup   not measured (bench=none, or nothing was compressed)")
    return lines
