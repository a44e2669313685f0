"""The sparse backend and benchmark configs (the `backend` and `bench` groups) and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

from sparsebench.errors import require


@dataclass
class BackendConfig:
    name: str = "none"  # none | direct_sparse | torch_cpu | ...
    activations: str = "fp32"  # fp32 | fp16 | bf16


@dataclass
class BenchConfig:
    enabled: bool = False
    batch_sizes: List[int] = field(default_factory=lambda: [1])
    baselines: List[str] = field(default_factory=list)
    warmup: int = 10
    repeats: int = 50


def validate_bench(backend: Any, bench: Any) -> None:
    require(backend.activations in ("fp32", "fp16", "bf16"), "backend.activations", backend.activations, "fp32, fp16 or bf16")
    require(all(bs >= 1 for bs in bench.batch_sizes), "bench.batch_sizes", list(bench.batch_sizes), "integers >= 1")
    require(bench.repeats >= 1, "bench.repeats", bench.repeats, "an integer >= 1")
    require(bench.warmup >= 0, "bench.warmup", bench.warmup, "an integer >= 0")
