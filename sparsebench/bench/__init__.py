"""Speed measurement: the backend registry, per-layer and whole-network timing, the kernel grid app."""

from sparsebench.bench.model import benchmark_model

__all__ = ["benchmark_model"]
