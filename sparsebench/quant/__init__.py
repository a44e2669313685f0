"""Quantization-aware training as a training hook, and the packed export.

``build_quantizer(cfg, model)`` -> the ``quant`` TrainHook (linear / pow2 / kmeans fake
quantization with a straight-through estimator), or None for ``quant=none``.
``export_model(model, hooks, path)`` -> ``packed.safetensors`` and per-layer facts.
"""

from sparsebench.lazy import lazy_exports

__all__ = ["build_quantizer", "export_model"]
__getattr__ = lazy_exports(
    __name__, {"build_quantizer": "sparsebench.quant.hook", "export_model": "sparsebench.quant.export"}
)
