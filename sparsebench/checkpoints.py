"""Checkpoint, weight and teacher files: written atomically and durably, read safely.

Every file is read with ``torch.load(..., weights_only=True)``: tensors and plain containers
only, so a hostile pickle (one whose objects run code when unpickled) is refused, never run.
What is saved is kept to that: the numpy RNG state goes in as a tensor, configs as plain dicts.
A missing, empty, truncated or foreign file is one ConfigError naming the config key that gave it.
"""

from __future__ import annotations

import io
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn

from sparsebench.errors import ConfigError
from sparsebench.rundir import atomic_write_bytes


def save(obj: Any, path: Path) -> None:
    """``torch.save`` through an atomic, durable write."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def load(path: Path, key: str, expected: str) -> Dict[str, Any]:
    """A saved dict, read safely; one ConfigError naming ``key`` (and what it should be) otherwise."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{key}: no such file ({expected})")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{key}: {file} holds more than tensors and plain containers, so it is not loaded "
            f"(weights_only refused it: {first[:160]}); {expected}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{key}: {file} is not a readable torch file (empty, truncated or another format: "
            f"{first[:160]}); {expected}"
        ) from None
    if not isinstance(state, dict):
        raise ConfigError(f"{key}: {file} holds a {type(state).__name__}, not a saved dict; {expected}")
    return state


# ---------------------------------------------------------------- RNG state (plain and tensors only)


def rng_state() -> Dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value: Any) -> Any:
    """random.setstate wants tuples where a round trip may give lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------- weights into a model


def fit_weights(model: nn.Module, weights: Any, key: str, expected: str) -> None:
    """load_state_dict; weights of another shape (or no weights at all) are named by the config key."""
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ConfigError(f"{key}: holds no model weights (a dict of tensors); {expected}")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        lines = str(e).splitlines()
        first = (lines[1] if len(lines) > 1 else lines[0]).strip()
        raise ConfigError(f"{key}: its weights do not fit {expected}: {first}") from None


def load_weights(model: nn.Module, path: str, key: str, expected: str) -> Dict[str, Any]:
    """A dense.pt or checkpoint's model weights into ``model``; returns the file's dict."""
    state = load(path, key, "give a dense.pt or checkpoints/last.pt of a run")
    fit_weights(model, state.get("model", state), key, expected)
    return state


def save_dense(path: Path, model: nn.Module, acc_dense: float, model_cfg: Dict[str, Any], data: str) -> None:
    """dense.pt: the weights, their test accuracy and what they are (the network and data), for sharing."""
    save({"model": model.state_dict(), "acc_dense": acc_dense, "model_cfg": model_cfg, "data": data}, path)


def read_dense(path: str, key: str, data: str) -> Dict[str, Any]:
    """Another run's dense.pt on the same data (``trainer.teacher``): its weights, network and accuracy."""
    state = load(path, key, f"give the dense.pt of a run on data={data}")
    spec = state.get("model_cfg")
    if not isinstance(spec, dict) or state.get("data") != data:
        found = f"model {spec}, data {state.get('data')!r}" if isinstance(spec, dict) else "no run's dense model"
        raise ConfigError(f"{key}: not the dense.pt of a run on data={data} (found {found})")
    return state


def load_checkpoint(path: Path) -> Optional[Dict[str, Any]]:
    """The run's last checkpoint (``trainer.resume=true``), checked for the keys the loop needs."""
    state = load(path, "trainer.resume=true", "resume needs the checkpoints/last.pt a run of this tool wrote")
    missing = [k for k in ("phase", "step", "model", "optimizer", "scheduler", "hooks", "rng") if k not in state]
    if missing:
        raise ConfigError(
            f"trainer.resume=true: {path} is not a checkpoint of this tool (missing "
            f"{', '.join(missing)}); start the run again without trainer.resume"
        )
    return state
