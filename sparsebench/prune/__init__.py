"""Unstructured pruning as a training hook (schedules and magnitude masks), and the
one-layer-at-a-time sensitivity study."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from torch import Tensor, nn

from sparsebench.layers import macs_per_weight
from sparsebench.prune.config import prunes
from sparsebench.prune.pruner import MagnitudePruner
from sparsebench.prune.sensitivity import sensitivity_study
from sparsebench.train import TrainHook

if TYPE_CHECKING:  # annotations only: no import at run time
    from sparsebench.prune.config import PruneConfig

__all__ = ["MagnitudePruner", "build_pruner", "sensitivity_study"]


def build_pruner(cfg: PruneConfig, model: nn.Module, sample: Optional[Tensor] = None) -> Optional[TrainHook]:
    """The pruning hook for ``cfg`` (a PruneConfig), or None when it prunes nothing
    (``prune=none``, or every target 0). ``sample``, an input batch, shows each weight's
    multiply-adds, which ``prune.macs_exponent`` weighs by.

    Checks what needs the model (layer regex, overrides) here, before any training.
    """
    if not prunes(cfg):
        return None
    if cfg.macs_exponent and sample is None:
        raise ValueError("prune.macs_exponent needs a sample input to count each weight's multiply-adds")
    return MagnitudePruner(cfg, model, macs_per_weight(model, sample) if cfg.macs_exponent else None)
