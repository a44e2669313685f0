"""Where results go: the run directory's files (atomic) and W&B (offline by default)."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

PACKAGE_DIR = Path(__file__).resolve().parent


def last_checkpoint(run_dir: Path) -> Path:
    """Where a run keeps the checkpoint that ``trainer.resume=true`` continues from."""
    return Path(run_dir) / "checkpoints" / "last.pt"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder and rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_csv(path: Path, rows: Sequence[Dict[str, Any]]) -> None:
    """Rows may differ in keys; the header is their union in first-seen order."""
    columns: List[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


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
    write_json(run_dir / "manifest.json", manifest)
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

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker(Tracker):
    def __init__(self, cfg: Any, run_dir: Path, config: Dict[str, Any], name: str):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=str(run_dir), name=name,
            group=cfg.group, job_type=cfg.job_type, tags=list(cfg.tags), config=config,
            reinit="finish_previous",  # one W&B run per job, also in a multirun process
            settings=wandb.Settings(console="off", silent=True),
        )
        # Final numbers in the runs table without custom panels (a sweep's table: one row a job).
        for key in ("acc_dense", "acc_final", "sparsity", "weight_bits", "compression", "footprint_bytes",
                    "macs_kept", "speedup/*"):
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

    def finish(self, exit_code: int = 0) -> None:
        if self.file is not None:
            self.file.close()
        self.inner.finish(exit_code)


def make_tracker(cfg: Any, run_dir: Path, config: Dict[str, Any], name: str, resume: bool = False) -> Tracker:
    inner = WandbTracker(cfg, run_dir, config, name) if cfg.name == "wandb" and cfg.mode != "disabled" else Tracker()
    return HistoryFile(Path(run_dir) / "history.jsonl", inner, append=resume)
