"""The packed sparse(-quantized) format and the direct sparse conv2d / linear ops."""

from sparsebench.sparse.format import PackedLayer, load_packed, pack_weight, save_packed
from sparsebench.sparse.ops import (
    autotune_plan,
    kernel_plan,
    kernels_available,
    reference_conv2d,
    reference_linear,
    require_kernels,
    set_autotune,
    sparse_conv2d,
    sparse_conv2d_into,
    sparse_linear,
)

__all__ = [
    "PackedLayer",
    "pack_weight",
    "save_packed",
    "load_packed",
    "sparse_conv2d",
    "sparse_linear",
    "sparse_conv2d_into",
    "reference_conv2d",
    "reference_linear",
    "kernels_available",
    "require_kernels",
    "kernel_plan",
    "autotune_plan",
    "set_autotune",
]
