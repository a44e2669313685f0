"""sparsebench: is the pruned and quantized CNN actually faster on a GPU?

The Python API (``sparsebench.api``): ``compress``, ``export``, ``load``, ``benchmark``, ``accuracy``.
They are imported on first use, so the command-line apps start without loading the training stack.
"""

from sparsebench.lazy import lazy_exports

__version__ = "0.1.0"
__all__ = ["compress", "export", "load", "benchmark", "accuracy"]
__getattr__ = lazy_exports(__name__, {name: "sparsebench.api" for name in __all__})
