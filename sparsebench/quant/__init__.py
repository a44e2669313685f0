"""Quantization-aware training as a training hook, and the packed export."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from sparsebench.train import TrainHook


def build_quantizer(cfg: Any, model: nn.Module) -> Optional[TrainHook]:
    """The QAT hook for ``cfg`` (a QuantConfig), or None for ``quant=none``."""
    if cfg.method == "none":
        return None
    raise NotImplementedError(f"quant.method={cfg.method!r} is not implemented yet")
