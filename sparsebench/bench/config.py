"""The sparse backend and benchmark configs (the `backend` and `bench` groups) and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List

from sparsebench.errors import require

# Kept here (no torch import) so config validation stays fast; tests check it matches the registry.
BACKEND_NAMES = ("cudnn_fp32", "cudnn_tf32", "cudnn_fp16", "direct_sparse", "torch_csr", "semi_structured_2to4",
                 "torch_cpu", "sparse_reference")
SPARSE_BACKEND_NAMES = ("none", "direct_sparse", "torch_csr", "sparse_reference")


@dataclass
class BackendConfig:
    name: str = "none"  # the backend under test: none | direct_sparse | torch_csr | sparse_reference
    activations: str = "fp32"  # fp32 | fp16 | bf16 (direct_sparse; the others compute in their own dtype)
    fallback: bool = True  # where it cannot run (no GPU/kernels): time sparse_reference on the CPU instead
    rowsplit_warps_per_row: int = 0  # direct_sparse: warps per output channel in the row-split kernel; 0 = auto


@dataclass
class BenchConfig:
    enabled: bool = False
    batch_sizes: List[int] = field(default_factory=lambda: [1])
    baselines: List[str] = field(default_factory=list)  # names from the backend registry
    warmup: int = 10
    repeats: int = 50  # timed runs per case; the median and IQR are reported
    cache: str = "flush"  # flush: overwrite L2 before every run | rotate: cycle inputs larger than L2
    layers: bool = True  # time every conv/linear layer
    network: bool = True  # time the whole network (CUDA graphs on the GPU)
    graphs: bool = True  # capture whole-network forwards into CUDA graphs
    break_even: bool = True  # per-layer break-even sparsity against each baseline
    cpu_threads: int = 1  # torch threads while timing on the CPU (0: torch's default); 1 is stable on busy hosts
    progress: bool = True


def validate_bench(backend: Any, bench: Any) -> None:
    require(backend.name in SPARSE_BACKEND_NAMES, "backend.name", backend.name,
            "one of " + ", ".join(SPARSE_BACKEND_NAMES))
    require(backend.rowsplit_warps_per_row in (0, 1, 2, 4), "backend.rowsplit_warps_per_row",
            backend.rowsplit_warps_per_row, "0 (automatic), 1, 2 or 4")
    require(backend.activations in ("fp32", "fp16", "bf16"), "backend.activations", backend.activations, "fp32, fp16 or bf16")
    require(backend.activations == "fp32" or backend.name in ("none", "direct_sparse"), "backend.activations",
            backend.activations, f"fp32 for backend {backend.name} (fp16/bf16 activations are direct_sparse only)")
    require(len(bench.batch_sizes) >= 1 and all(bs >= 1 for bs in bench.batch_sizes), "bench.batch_sizes",
            list(bench.batch_sizes), "a non-empty list of integers >= 1")
    require(bench.repeats >= 20, "bench.repeats", bench.repeats, "an integer >= 20 (medians of fewer runs are noise)")
    require(bench.warmup >= 0, "bench.warmup", bench.warmup, "an integer >= 0")
    require(bench.cache in ("flush", "rotate"), "bench.cache", bench.cache, "flush or rotate")
    require(bench.cpu_threads >= 0, "bench.cpu_threads", bench.cpu_threads, "an integer >= 0 (0: torch's default)")
    for name in bench.baselines:
        require(name in BACKEND_NAMES, "bench.baselines", name, "names from " + ", ".join(BACKEND_NAMES))
    if bench.enabled:
        require(backend.name != "none", "backend.name", backend.name,
                "a sparse backend when bench.enabled=true (backend=direct_sparse, torch_csr or sparse_reference)")
