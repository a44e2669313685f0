"""The quantization config (the `quant` group) and its checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

from sparsebench.errors import require

METHODS = ("none", "linear", "pow2", "kmeans")


@dataclass
class QuantConfig:
    method: str = "none"  # none | linear | pow2 | kmeans
    bits: int = 32  # 2..8 for a quantizer; 32 means unquantized
    symmetric: bool = True
    per_channel: bool = True
    learn_scale: bool = False  # LSQ-style learned scales for linear
    start: float = 0.0  # epoch of the finetune phase at which QAT begins
    refit_every: int = 1  # kmeans: re-fit codebooks every N epochs
    overrides: Dict[str, int] = field(default_factory=dict)  # name or regex -> bits


def validate_quant(q: Any) -> None:
    require(q.method in METHODS, "quant.method", q.method, "one of " + ", ".join(METHODS))
    if q.method == "none":
        require(q.bits == 32, "quant.bits", q.bits, "32 when quant.method=none (choose quant=linear, pow2 or kmeans for 2..8)")
    else:
        require(2 <= q.bits <= 8, "quant.bits", q.bits, f"an integer in 2..8 for quant.method={q.method}")
    require(q.start >= 0, "quant.start", q.start, "a number >= 0")
    require(q.refit_every >= 1, "quant.refit_every", q.refit_every, "an integer >= 1")
    for pattern, bits in q.overrides.items():
        require(2 <= bits <= 8, f"quant.overrides.{pattern}", bits, "an integer in 2..8")
