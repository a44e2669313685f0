"""Speed measurement: the backend registry, per-layer and whole-network timing, the kernel grid app."""

from sparsebench.lazy import lazy_exports

__all__ = ["benchmark_model"]
__getattr__ = lazy_exports(__name__, {"benchmark_model": "sparsebench.bench.model"})
