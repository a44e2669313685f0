"""The pruning config (the `prune` group) and its checks."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from sparsebench.errors import ConfigError, require

METHODS = ("none", "agp", "iterative", "oneshot")


@dataclass
class PruneConfig:
    method: str = "none"  # none | agp | iterative | oneshot
    initial_sparsity: float = 0.0
    final_sparsity: float = 0.0
    start: float = 0.0  # in `unit`s from the start of the finetune phase
    end: float = 0.0
    frequency: float = 1.0  # mask updates every `frequency` units
    unit: str = "epoch"  # epoch | step
    rounds: int = 1  # iterative: number of prune-then-retrain cycles
    scope: str = "layer"  # layer | global
    keep_first_dense: bool = True  # the first conv stays dense
    keep_last_dense: bool = True  # the classifier stays dense
    layers: Optional[str] = None  # regex over module names that may be pruned (None: every conv/linear)
    overrides: Dict[str, float] = field(default_factory=dict)  # name or regex -> final sparsity


def validate_prune(p: Any) -> None:
    require(p.method in METHODS, "prune.method", p.method, "one of " + ", ".join(METHODS))
    require(p.unit in ("epoch", "step"), "prune.unit", p.unit, "epoch or step")
    require(p.scope in ("layer", "global"), "prune.scope", p.scope, "layer or global")
    for key in ("initial_sparsity", "final_sparsity"):
        value = getattr(p, key)
        require(0 <= value < 1, f"prune.{key}", value, "a fraction in [0, 1)")
    require(p.final_sparsity >= p.initial_sparsity, "prune.final_sparsity", p.final_sparsity,
             f"a fraction >= prune.initial_sparsity ({p.initial_sparsity})")
    require(p.start >= 0, "prune.start", p.start, "a number >= 0")
    require(p.end >= p.start, "prune.end", p.end, f"a number >= prune.start ({p.start})")
    require(p.frequency > 0, "prune.frequency", p.frequency, "a number > 0")
    require(p.rounds >= 1, "prune.rounds", p.rounds, "an integer >= 1")
    for pattern, value in p.overrides.items():
        require(0 <= value < 1, f"prune.overrides.{pattern}", value, "a fraction in [0, 1)")
    for key, pattern in [("prune.layers", p.layers)] + [(f"prune.overrides.{k}", k) for k in p.overrides]:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"{key}: {pattern!r} is not a valid regular expression ({e})") from None
