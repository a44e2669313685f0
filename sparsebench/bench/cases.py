"""What gets timed: one conv/linear layer with its weights, packed form and real input shape.

Cases come from a trained model (+ its packed export) in the experiment, or from layer
shapes with random unstructured masks and quantized values in the kernel-only sweep.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from sparsebench import layers as layer_facts
from sparsebench.sparse.codes import pack_codes
from sparsebench.sparse.format import PackedLayer, pack_weight
from sparsebench.sparse.synthetic import linear_codes, random_sparse_weight


@dataclass
class LayerCase:
    name: str
    kind: str  # "conv2d" | "linear"
    in_shape: Tuple[int, ...]  # per sample: (C, H, W) or (features,)
    packed: PackedLayer  # what the sparse backend runs
    weight: torch.Tensor  # the same weight dense, fp32 on the CPU (packed.dequantize())
    bias: Optional[torch.Tensor] = None

    @property
    def stride(self) -> int:
        return self.packed.stride

    @property
    def padding(self) -> int:
        return self.packed.padding

    @property
    def out_channels(self) -> int:
        return self.packed.out_channels

    @property
    def sparsity(self) -> float:
        return self.packed.sparsity

    @property
    def bits(self) -> int:
        return self.packed.bits

    def out_shape(self) -> Tuple[int, ...]:
        if self.kind == "linear":
            return (self.out_channels,)
        _, h, w = self.in_shape
        kh, kw = self.packed.kernel_size
        oh = (h + 2 * self.padding - kh) // self.stride + 1
        ow = (w + 2 * self.padding - kw) // self.stride + 1
        return (self.out_channels, oh, ow)

    def output_pixels(self) -> int:
        """Output positions per sample each weight row is applied at."""
        return 1 if self.kind == "linear" else self.out_shape()[1] * self.out_shape()[2]

    def dense_flops(self, batch: int) -> int:
        return 2 * batch * self.output_pixels() * self.packed.out_channels * self.packed.row_length

    def sparse_flops(self, batch: int) -> int:
        return 2 * batch * self.output_pixels() * self.packed.nnz

    def facts(self) -> Dict[str, Any]:
        """The layers.csv / bench.csv geometry columns."""
        kh, kw = self.packed.kernel_size
        return {
            "layer": self.name,
            "kind": self.kind,
            "in_shape": "x".join(map(str, self.in_shape)),
            "out_channels": self.out_channels,
            "kernel": f"{kh}x{kw}" if self.kind == "conv2d" else None,
            "stride": self.stride if self.kind == "conv2d" else None,
            "sparsity": round(self.sparsity, 6),
            "bits": self.bits,
            "nnz": self.packed.nnz,
            "row_nnz_max": self.packed.row_nnz_max,
            "rows_empty": int((self.packed.row_nnz() == 0).sum()),
            "params": self.packed.out_channels * self.packed.row_length,
        }


def case_from_packed(name: str, packed: PackedLayer, in_shape: Sequence[int]) -> LayerCase:
    bias = packed.bias.detach().cpu().float() if packed.bias is not None else None
    return LayerCase(
        name=name,
        kind=packed.kind,
        in_shape=tuple(int(s) for s in in_shape),
        packed=packed.to("cpu"),
        weight=packed.to("cpu").dequantize(),
        bias=bias,
    )


def module_weight(module: nn.Module) -> torch.Tensor:
    """The weight the module computes with (through any parametrization: masks, fake quantization)."""
    with torch.no_grad():
        return module.weight.detach().to("cpu", torch.float32).clone()


def cases_from_model(
    model: nn.Module, sample: torch.Tensor, packed: Optional[Dict[str, PackedLayer]] = None
) -> List[LayerCase]:
    """One case per conv/linear layer: the exported packed layer where there is one, else packed here."""
    shapes = layer_facts.input_shapes(model, sample)
    packed = packed or {}
    cases = []
    for name, m in layer_facts.weight_layers(model).items():
        layer = packed.get(name)
        if layer is None:
            is_conv = isinstance(m, nn.Conv2d)
            bias = m.bias.detach().cpu() if m.bias is not None else None
            layer = pack_weight(
                module_weight(m), bias, stride=m.stride[0] if is_conv else 1, padding=m.padding[0] if is_conv else 0
            )
        cases.append(case_from_packed(name, layer, shapes[name]))
    return cases


# ------------------------------------------------------------------ synthetic layers (kernel sweep)


def synthetic_case(
    name: str,
    kind: str,
    c_in: int,
    c_out: int,
    kernel: int,
    hw: int,
    stride: int,
    padding: int,
    sparsity: float,
    bits: int,
    generator: torch.Generator,
    row_skew: float = 0.0,
) -> LayerCase:
    """A layer of the given shape with a random unstructured mask; bits 32 = fp32 values, 16 = fp16, else codes.
    ``row_skew``: sigma of lognormal row lengths (0: uniform)."""
    shape = (c_out, c_in, kernel, kernel) if kind == "conv2d" else (c_out, c_in)
    kaiming = math.sqrt(2.0 / math.prod(shape[1:]))
    w = random_sparse_weight(shape, sparsity, generator, row_skew=row_skew) * kaiming
    geo = dict(stride=stride, padding=padding) if kind == "conv2d" else {}
    if bits == 32:
        packed = pack_weight(w, **geo)
    elif bits == 16:
        packed = pack_weight(w, value_dtype=torch.float16, **geo)
    else:
        codes, scale, zero_point = linear_codes(w, bits)
        decoded = (codes.reshape(c_out, -1) - zero_point[:, None]).to(torch.float32) * scale[:, None]
        packed = pack_weight(decoded.reshape(shape), bits=bits, codes=codes, scale=scale, zero_point=zero_point, **geo)
    in_shape = (c_in, hw, hw) if kind == "conv2d" else (c_in,)
    return case_from_packed(name, packed, in_shape)


# ------------------------------------------------------------------ thinning (break-even estimate)


def thin(layer: PackedLayer, keep: float, generator: torch.Generator) -> PackedLayer:
    """The same layer with a random ``keep`` share of its nonzeros (at least one per nonempty row)."""
    nnz = layer.nnz
    if nnz == 0:
        return layer
    rows = layer.rows()
    score = torch.rand(nnz, generator=generator)
    selected = score < keep
    # Keep each nonempty row alive, so per-row fixed costs stay in the picture.
    first = layer.rowptr[:-1].to(torch.int64)[(layer.rowptr[1:] > layer.rowptr[:-1])]
    selected[first] = True
    counts = torch.bincount(rows[selected], minlength=layer.out_channels)
    rowptr = torch.zeros(layer.out_channels + 1, dtype=torch.int64)
    rowptr[1:] = torch.cumsum(counts, 0)
    if layer.value_kind in ("float32", "float16"):
        values = layer.values[selected].contiguous()
    else:
        values = pack_codes(layer.codes()[selected], layer.bits)
    order = torch.argsort(counts, descending=True, stable=True).to(torch.int32)
    return dataclasses.replace(
        layer,
        rowptr=rowptr.to(torch.int32),
        colidx=layer.colidx[selected].contiguous(),
        row_order=order.contiguous(),
        values=values,
    )
