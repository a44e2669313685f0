"""The quantization config (the `quant` group) and its checks."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from sparsebench.errors import ConfigError, require

METHODS = ("none", "linear", "pow2", "kmeans")
MIN_BITS, MAX_BITS = 2, 8
UNITS = ("epoch", "fraction")
FP32 = 32  # a per-layer override of 32 keeps that layer unquantized (fp32)


@dataclass
class QuantConfig:
    method: str = "none"  # none | linear | pow2 | kmeans
    bits: int = 32  # 2..8 for a quantizer; 32 means unquantized
    symmetric: bool = True  # linear: codes centred on zero (else an integer zero point per scale)
    per_channel: bool = True  # linear: one scale per output channel (pow2: per layer; kmeans: see kmeans_per_channel)
    learn_scale: bool = False  # linear: LSQ-style learned scales (else max-abs / min-max statistics)
    start: float = 0.0  # when QAT begins, in `unit`s of the finetune phase (may overlap pruning)
    unit: str = "epoch"  # epoch | fraction (of the finetune phase's length)
    refit_every: int = 1  # kmeans: re-fit codebooks every N epochs after QAT begins (not after the last)
    kmeans_iters: int = 30  # kmeans: Lloyd iterations per fit
    # kmeans: one codebook per output channel instead of one per layer. Its own key rather than
    # per_channel: that key, true by default, was recorded (and ignored) in every earlier kmeans run.
    kmeans_per_channel: bool = False
    overrides: Dict[str, int] = field(default_factory=dict)  # layer name or regex -> bits (32: keep fp32)


# The keys one method reads and the others ignore; every quantizer reads bits, start and overrides.
ONE_METHOD_KEYS = {
    "symmetric": "linear",
    "per_channel": "linear",
    "learn_scale": "linear",
    "refit_every": "kmeans",
    "kmeans_iters": "kmeans",
    "kmeans_per_channel": "kmeans",
}


def method_reads(method: str, key: str) -> bool:
    """Whether quant.method=``method`` uses quant.``key`` (method and bits always: none and 32 say what ran)."""
    if key in ("method", "bits"):
        return True
    return method != "none" and ONE_METHOD_KEYS.get(key, method) == method


def validate_quant(q: Any, finetune_epochs: Optional[int] = None) -> None:
    """Check ``q`` (a QuantConfig) from the config alone; ``finetune_epochs`` bounds ``quant.start``.

    Checks that need the model (overrides name a layer, codebooks fit) run in ``build_quantizer``.
    """
    require(q.method in METHODS, "quant.method", q.method, "one of " + ", ".join(METHODS))
    if q.method == "none":
        require(
            q.bits == FP32,
            "quant.bits",
            q.bits,
            "32 when quant.method=none (weights=fp32 sets both; quant=linear, pow2 or kmeans take 2..8)",
        )
        require(not q.overrides, "quant.overrides", dict(q.overrides), "empty when quant.method=none")
    else:
        require(
            MIN_BITS <= q.bits <= MAX_BITS,
            "quant.bits",
            q.bits,
            f"an integer in {MIN_BITS}..{MAX_BITS} for quant.method={q.method}",
        )
    require(q.unit in UNITS, "quant.unit", q.unit, "epoch or fraction")
    require(q.start >= 0, "quant.start", q.start, f"a number >= 0 ({q.unit}s into the finetune phase)")
    if q.unit == "fraction":
        require(
            q.start <= 1,
            "quant.start",
            q.start,
            "a fraction of the finetune phase in [0, 1] with quant.unit=fraction; 1 quantizes after retraining",
        )
    elif finetune_epochs is not None and q.method != "none":
        require(
            q.start <= finetune_epochs,
            "quant.start",
            q.start,
            f"at most trainer.finetune_epochs "
            f"({finetune_epochs}); quant.start=trainer.finetune_epochs quantizes after retraining, without QAT",
        )
    require(q.refit_every >= 1, "quant.refit_every", q.refit_every, "an integer >= 1")
    require(q.kmeans_iters >= 1, "quant.kmeans_iters", q.kmeans_iters, "an integer >= 1")
    for pattern, bits in q.overrides.items():
        require(
            MIN_BITS <= bits <= MAX_BITS or bits == FP32,
            f"quant.overrides.{pattern}",
            bits,
            f"an integer in {MIN_BITS}..{MAX_BITS}, or 32 to keep that layer fp32",
        )
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(
                f"quant.overrides.{pattern}: {pattern!r} is not a valid layer name or regular expression ({e})"
            ) from None
