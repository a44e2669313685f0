"""Quantization-aware training as a training hook, and the packed export."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from torch import nn

from sparsebench.train import TrainHook


def build_quantizer(cfg: Any, model: nn.Module) -> Optional[TrainHook]:
    """The QAT hook for ``cfg`` (a QuantConfig), or None for ``quant=none``."""
    if cfg.method == "none":
        return None
    raise NotImplementedError(f"quant.method={cfg.method!r} is not implemented yet")


def export_model(model: nn.Module, hooks: List[TrainHook], path: Path) -> Optional[Dict[str, Dict[str, Any]]]:
    """Pack every conv/linear layer into ``path`` (packed.safetensors + metadata).

    Returns per-layer facts ``{layer: {"bits", "footprint_bytes", ...}}``, or None when
    nothing was exported (then the run reports the dense footprint).
    """
    return None
