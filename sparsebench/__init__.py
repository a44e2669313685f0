"""sparsebench: is the pruned and quantized CNN actually faster on a GPU?

The Python API (``sparsebench.api``): ``compress``, ``export``, ``load``, ``benchmark``, ``accuracy``.
They are imported on first use, so the command-line apps start without loading the training stack.
"""

__version__ = "0.1.0"
__all__ = ["compress", "export", "load", "benchmark", "accuracy"]


def __getattr__(name: str):
    if name in __all__:
        from sparsebench import api  # late: `import sparsebench` (the CLI's first line) stays light

        return getattr(api, name)
    raise AttributeError(f"module 'sparsebench' has no attribute {name!r}")
