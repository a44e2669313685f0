"""The sparse backend and benchmark configs (the `backend` and `bench` groups) and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

from sparsebench.errors import require

# Kept here (no torch import) so config validation stays fast; tests check it matches the registry.
BACKEND_NAMES = (
    "cudnn_fp32",
    "cudnn_tf32",
    "cudnn_fp16",
    "cudnn_bf16",
    "direct_sparse",
    "torch_csr",
    "semi_structured_2to4",
    "torch_cpu",
    "sparse_reference",
)
SPARSE_BACKEND_NAMES = ("none", "direct_sparse", "torch_csr", "sparse_reference")

# The CUDA dispatcher's knobs (`_C.set_tuning`, docs/kernels.md) and what each accepts; a knob
# left out of backend.tuning keeps its default.
KERNEL_TUNING = {
    "smem_budget": ("8192..232448 (bytes of shared memory a staged block may use)", lambda v: 8192 <= v <= 227 * 1024),
    "rowsplit_max_pixels": ("an integer >= 0 (output pixels up to which the row-split kernel runs)", lambda v: v >= 0),
    "blocks_per_sm": ("1..32", lambda v: 1 <= v <= 32),
    "min_reuse": ("an integer >= 1 (FMAs per staged input value)", lambda v: v >= 1),
    "virtual_width": ("0 or 1", lambda v: v in (0, 1)),
    "rowsplit_warps_per_row": ("0 (automatic), 1, 2 or 4", lambda v: v in (0, 1, 2, 4)),
    "stage_v": ("0 (automatic), 1, 2 or 4 (output pixels per lane of the staged kernel)", lambda v: v in (0, 1, 2, 4)),
    "min_rows": ("an integer >= 1 (fewest output channels per staged block)", lambda v: v >= 1),
    "tc_mt": ("1, 2, 4 or 8 (m16 pixel tiles per warp of the tensor-core kernel)", lambda v: v in (1, 2, 4, 8)),
    "tc_pixels": ("16..1024 (output pixels a tensor-core block aims for)", lambda v: 16 <= v <= 1024),
    "tc_warps_k": ("1, 2, 4 or 8 (warps that split one channel group's taps)", lambda v: v in (1, 2, 4, 8)),
    "tc_smem_budget": (
        "8192..232448 (bytes of shared memory a tensor-core block may stage)",
        lambda v: 8192 <= v <= 227 * 1024,
    ),
    "tc_pack_images": ("0 or 1 (narrow images side by side in a tensor-core tile)", lambda v: v in (0, 1)),
    "tc_pairs": (
        "0, 1, 2, 4 or 8 (the tensor cores' sparse MMAs on the 2:4 weight stream, that many groups a k-step; "
        "0: dense; 8: the implicit-GEMM kernel on the split stream)",
        lambda v: v in (0, 1, 2, 4, 8),
    ),
    "tc_gemm_tile": (
        "0..14 (the implicit-GEMM kernel's block tile: cuda/sparsebench.h kGemmTiles; 7-14 use Hopper's wgmma)",
        lambda v: 0 <= v <= 14,
    ),
    "tc_wgmma": ("0 or 1 (1: the implicit GEMM's wgmma tiles may run, on Hopper)", lambda v: v in (0, 1)),
}


@dataclass
class BackendConfig:
    name: str = "none"  # the backend under test: none | direct_sparse | torch_csr | sparse_reference
    activations: str = "fp32"  # fp32 | fp16 | bf16 (direct_sparse; the others compute in their own dtype)
    fallback: bool = True  # where it cannot run (no GPU/kernels): time sparse_reference on the CPU instead
    tuning: Dict[str, int] = field(
        default_factory=dict
    )  # direct_sparse: dispatcher knobs (KERNEL_TUNING), e.g. +backend.tuning.min_reuse=48
    # direct_sparse: time the candidate plans per layer and input shape first (as cuDNN's benchmark mode).
    autotune: bool = True


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


def validate_bench(backend: BackendConfig, bench: BenchConfig) -> None:
    require(
        backend.name in SPARSE_BACKEND_NAMES, "backend.name", backend.name, "one of " + ", ".join(SPARSE_BACKEND_NAMES)
    )
    for knob, value in backend.tuning.items():
        require(
            knob in KERNEL_TUNING, f"backend.tuning.{knob}", value, "a knob of the kernels: " + ", ".join(KERNEL_TUNING)
        )
        require(
            KERNEL_TUNING[knob][1](value) and value < 2**31, f"backend.tuning.{knob}", value, KERNEL_TUNING[knob][0]
        )
        require(
            backend.name == "direct_sparse",
            f"backend.tuning.{knob}",
            value,
            f"only with backend=direct_sparse (the knobs are its kernels'; backend is {backend.name})",
        )
        require(
            not backend.autotune,
            f"backend.tuning.{knob}",
            value,
            "only with backend.autotune=false (the autotuner sets the knobs itself; add backend.autotune=false)",
        )
    require(
        backend.activations in ("fp32", "fp16", "bf16"),
        "backend.activations",
        backend.activations,
        "fp32, fp16 or bf16",
    )
    require(
        backend.activations == "fp32" or backend.name in ("none", "direct_sparse"),
        "backend.activations",
        backend.activations,
        f"fp32 for backend {backend.name} (fp16/bf16 activations are direct_sparse only)",
    )
    require(
        len(bench.batch_sizes) >= 1 and all(bs >= 1 for bs in bench.batch_sizes),
        "bench.batch_sizes",
        list(bench.batch_sizes),
        "a non-empty list of integers >= 1",
    )
    require(bench.repeats >= 20, "bench.repeats", bench.repeats, "an integer >= 20 (medians of fewer runs are noise)")
    require(bench.warmup >= 0, "bench.warmup", bench.warmup, "an integer >= 0")
    require(bench.cache in ("flush", "rotate"), "bench.cache", bench.cache, "flush or rotate")
    require(bench.cpu_threads >= 0, "bench.cpu_threads", bench.cpu_threads, "an integer >= 0 (0: torch's default)")
    for name in bench.baselines:
        require(name in BACKEND_NAMES, "bench.baselines", name, "names from " + ", ".join(BACKEND_NAMES))
    if bench.enabled:
        require(
            backend.name != "none",
            "backend.name",
            backend.name,
            "a sparse backend when bench.enabled=true (backend=direct_sparse, torch_csr or sparse_reference)",
        )
