"""Unstructured pruning as a training hook (schedules and magnitude masks), and the
one-layer-at-a-time sensitivity study."""

from sparsebench.lazy import lazy_exports

__all__ = ["MagnitudePruner", "build_pruner", "sensitivity_study"]
__getattr__ = lazy_exports(
    __name__,
    {
        "MagnitudePruner": "sparsebench.prune.pruner",
        "build_pruner": "sparsebench.prune.pruner",
        "sensitivity_study": "sparsebench.prune.sensitivity",
    },
)
