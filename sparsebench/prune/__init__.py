"""Unstructured pruning as a training hook (schedules and magnitude masks), and the
one-layer-at-a-time sensitivity study."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from sparsebench.prune.config import prunes
from sparsebench.prune.pruner import MagnitudePruner
from sparsebench.prune.sensitivity import sensitivity_study
from sparsebench.train import TrainHook

__all__ = ["MagnitudePruner", "build_pruner", "sensitivity_study"]


def build_pruner(cfg: Any, model: nn.Module) -> Optional[TrainHook]:
    """The pruning hook for ``cfg`` (a PruneConfig), or None when it prunes nothing
    (``prune=none``, or every target 0).

    Checks what needs the model (layer regex, overrides) here, before any training.
    """
    if not prunes(cfg):
        return None
    return MagnitudePruner(cfg, model)
