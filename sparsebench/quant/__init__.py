"""Quantization-aware training as a training hook, and the packed export.

``build_quantizer(cfg, model)`` -> the ``quant`` TrainHook (linear / pow2 / kmeans fake
quantization with a straight-through estimator), or None for ``quant=none``.
``export_model(model, hooks, path)`` -> ``packed.safetensors`` and per-layer facts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from torch import nn

from sparsebench.quant.export import export_packed
from sparsebench.quant.hook import Quantizer
from sparsebench.train import TrainHook

if TYPE_CHECKING:  # annotations only: no import at run time
    from sparsebench.quant.config import QuantConfig


def build_quantizer(cfg: QuantConfig, model: nn.Module) -> Optional[TrainHook]:
    """The QAT hook for ``cfg`` (a QuantConfig), or None for ``quant=none``.

    Checks what needs the model before any training: per-layer overrides must name a layer,
    and a layer's one kmeans codebook must not have more levels than the layer has non-zero weights.
    """
    if cfg.method == "none":
        return None
    return Quantizer(cfg, model)


def export_model(model: nn.Module, hooks: List[TrainHook], path: Path) -> Optional[Dict[str, Dict[str, Any]]]:
    """Pack every conv/linear layer into ``path`` (packed.safetensors + metadata).

    Returns per-layer facts ``{layer: {"bits", "footprint_bytes", "dense_bytes", ...}}``, or
    None when nothing was exported: a run without pruning or quantization stays dense and
    reports the dense footprint. Quantized layers are stored as codes on their QAT grid,
    the others (``quant=none``, or a layer kept at 32 bits) as fp32 values; BatchNorms are
    folded into the layer that feeds them.
    """
    if not hooks:
        return None
    quantizer = next((h for h in hooks if getattr(h, "name", None) == "quant"), None)
    return export_packed(model, quantizer, Path(path))
