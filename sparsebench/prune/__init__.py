"""Unstructured pruning as a training hook (schedules and magnitude masks)."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from sparsebench.train import TrainHook


def build_pruner(cfg: Any, model: nn.Module) -> Optional[TrainHook]:
    """The pruning hook for ``cfg`` (a PruneConfig), or None for ``prune=none``."""
    if cfg.method == "none":
        return None
    raise NotImplementedError(f"prune.method={cfg.method!r} is not implemented yet")
