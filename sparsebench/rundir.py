"""The run directory: what a run writes where, how it is written, and reading it back.

Every experiment-like command writes one folder per run (``hydra.run.dir``, or a sweep's job
folder). The file names here are a contract other tools read (DESIGN.md section 3). Writes are
atomic and durable: a temporary file in the same folder, flushed and fsynced, then renamed, so a
reader (or a crash) never sees half a file.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

METRICS = "metrics.json"  # one flat object: status, accuracies, sizes, speedups (written whatever happens)
MANIFEST = "manifest.json"  # the resolved config, overrides, versions, git state, GPU
LAYERS = "layers.csv"  # one row per layer x backend x batch
BENCH = "bench.csv"  # sparsebench-bench: one row per layer x backend x batch x sparsity x bits
PACKED = "packed.safetensors"  # the exported sparse(-quantized) layers
DENSE = "dense.pt"  # the dense model, to share (trainer.init_from) or distil (trainer.teacher)
HISTORY = "history.jsonl"  # every logged metric by step
CHECKPOINT = Path("checkpoints") / "last.pt"  # what trainer.resume=true continues from
WANDB_ID = "wandb-id.txt"  # the W&B run id, so a resumed run continues its W&B run

# <sweep_dir>/dense-<key>/: a sweep's shared dense pre-training, beside its jobs (not one of them).
DENSE_DIR_PREFIX = "dense-"


def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT


def is_shared_dense(job_dir_name: str) -> bool:
    return job_dir_name.startswith(DENSE_DIR_PREFIX)


def job_method(prune_method: str, quant_method: str) -> str:
    """What a job does to the model: "dense", "agp", "linear", "agp+linear"."""
    return "+".join(m for m in (prune_method, quant_method) if m not in (None, "none")) or "dense"


# ---------------------------------------------------------------- writing


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (the bytes reach the disk before the rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_csv(path: Path, rows: Sequence[Dict[str, Any]]) -> None:
    """Rows may differ in keys; the header is their union in first-seen order."""
    columns: List[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


# ---------------------------------------------------------------- reading


class Unreadable(ValueError):
    """A run file that exists but cannot be parsed (truncated, edited, not JSON)."""


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    """A JSON object from ``path``: None when there is no such file, Unreadable when it does not parse."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise Unreadable(f"{path}: cannot be read ({e.strerror})") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise Unreadable(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise Unreadable(f"{path}: holds a {type(data).__name__}, not a JSON object")
    return data


def read_metrics(run_dir: Path) -> Optional[Dict[str, Any]]:
    """The run's metrics.json (None when it has none; Unreadable when it cannot be parsed)."""
    return read_json(Path(run_dir) / METRICS)


def metrics_or_empty(run_dir: Path) -> Dict[str, Any]:
    """The run's metrics, or {} when they are missing or unreadable (a job to run again)."""
    try:
        return read_metrics(run_dir) or {}
    except Unreadable:
        return {}


def manifest_config(run_dir: Path) -> Optional[Dict[str, Any]]:
    """The resolved config the run recorded in manifest.json; None when there is none or it is unreadable."""
    try:
        manifest = read_json(Path(run_dir) / MANIFEST)
    except Unreadable:
        return None
    config = manifest.get("config") if manifest else None
    return config if isinstance(config, dict) else None
