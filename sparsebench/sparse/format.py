"""The packed sparse(-quantized) weight format: CSR over output channels.

One ``PackedLayer`` holds a conv2d or linear weight with only its nonzeros stored:

- ``rowptr`` int32 [C_out+1]; ``colidx`` [nnz] sorted within each row, the flat index
  ``(c_in*KH + kh)*KW + kw`` (linear: the input feature). 16-bit (stored in an int16 tensor,
  read as *unsigned* 16 bits) when ``C_in*KH*KW <= 65536``, else int32.
- ``row_order`` int32 [C_out]: the rows sorted by nnz, heaviest first, so the kernels can
  schedule similar rows together (load balance).
- values, one of ``value_kind``:
  ``float32`` / ``float16``: the weights themselves;
  ``linear``: ``bits``-wide unsigned codes with ``value = scale[row] * (code - zero_point[row])``;
  ``codebook``: ``bits``-wide codes with ``value = codebook[code]`` (``codebook`` [levels], one for
  the layer) or ``value = codebook[row, code]`` (``codebook`` [C_out, levels], one per output channel).
  Codes are packed little-end first into bytes: nonzero k sits at bit ``k*bits`` of the stream.
- ``bias`` fp32 [C_out] or None, and the geometry (stride, padding; dilation 1, groups 1).
- ``tile_rows``, ``tile_kptr``, ``tile_cols``: the tensor-core tiles (``sparse/tiles.py``): output channels
  in groups of 16 and each group's condensed taps. In the file since version 2; version 1 files get them
  built on load. ``footprint_bytes`` counts the CSR alone (the compressed weight); ``tile_bytes`` these.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sparsebench.sparse.codes import CODE_BITS, INDEX16_LIMIT, index_tensor, pack_codes, unpack_codes, unsigned
from sparsebench.sparse.tiles import TILE_K, TILE_ROWS, build_tiles

FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")  # version 1: no tensor-core tiles (built on load)
VALUE_KINDS = ("float32", "float16", "linear", "codebook")

# Tensors a layer may hold, in file order; None-valued ones are simply absent.
_TENSOR_FIELDS = (
    "rowptr",
    "colidx",
    "row_order",
    "values",
    "scale",
    "zero_point",
    "codebook",
    "bias",
    "tile_rows",
    "tile_kptr",
    "tile_cols",
)
_TILE_FIELDS = ("tile_rows", "tile_kptr", "tile_cols")
# Metadata fields of a layer that change what it computes: covered by its geometry checksum.
_GEOMETRY_FIELDS = ("kind", "weight_shape", "stride", "padding", "value_kind", "bits", "index_bits", "nnz")


@dataclasses.dataclass
class PackedLayer:
    kind: str  # "conv2d" | "linear"
    weight_shape: Tuple[int, ...]  # (C_out, C_in, KH, KW) or (out, in)
    stride: int
    padding: int
    value_kind: str
    bits: int  # 32 / 16 for float values, else the code width
    rowptr: torch.Tensor
    colidx: torch.Tensor
    row_order: torch.Tensor
    values: torch.Tensor
    scale: Optional[torch.Tensor] = None
    zero_point: Optional[torch.Tensor] = None
    codebook: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    tile_rows: Optional[torch.Tensor] = None
    tile_kptr: Optional[torch.Tensor] = None
    tile_cols: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        # The longest row, counted where it is free (a GPU rowptr is counted on first use instead).
        self._row_nnz_max: Optional[int] = self._longest_row() if self.rowptr.device.type == "cpu" else None
        # Kernel plans the autotuner measured best, by input (shape, dtype, device); kept in memory only
        # and not handed on by to(): a plan is timed on one device.
        self.tuned_plans: Dict[tuple, int] = {}
        # The tensor-core weight streams by (activation dtype, groups a 2:4 k-step serves; 0: the dense-MMA
        # stream; split.SPLIT: the implicit-GEMM kernel's), derived from the tiles (tiles.py, pairs.py, split.py).
        self.streams: Dict[Tuple[torch.dtype, int], Any] = {}

    # -- geometry ---------------------------------------------------------------------
    @property
    def out_channels(self) -> int:
        return int(self.weight_shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight_shape[1])

    @property
    def kernel_size(self) -> Tuple[int, int]:
        return (int(self.weight_shape[2]), int(self.weight_shape[3])) if self.kind == "conv2d" else (1, 1)

    @property
    def row_length(self) -> int:
        """Columns of the dense matrix: C_in*KH*KW."""
        kh, kw = self.kernel_size
        return self.in_channels * kh * kw

    @property
    def nnz(self) -> int:
        return int(self.colidx.numel())

    @property
    def row_nnz_max(self) -> int:
        """Nonzeros of the longest row: the kernels split long rows across warps. Counted once, on the
        CPU where the layer is built or loaded; ``to()`` hands it on (replacing ``rowptr`` later does not)."""
        if self._row_nnz_max is None:
            self._row_nnz_max = self._longest_row()
        return self._row_nnz_max

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / max(1, self.out_channels * self.row_length)

    @property
    def index_bits(self) -> int:
        return 16 if self.colidx.dtype == torch.int16 else 32

    # -- decoding ---------------------------------------------------------------------
    def columns(self) -> torch.Tensor:
        """The column index of every nonzero as int64 (undoes the unsigned 16-bit storage)."""
        return unsigned(self.colidx)

    def row_nnz(self) -> torch.Tensor:
        """Nonzeros of every row (output channel), int64 [C_out]."""
        return (self.rowptr[1:] - self.rowptr[:-1]).to(torch.int64)

    def _longest_row(self) -> int:
        return int(self.row_nnz().max()) if self.out_channels else 0

    def rows(self) -> torch.Tensor:
        """The row (output channel) of every nonzero, int64 [nnz]."""
        counts = self.row_nnz()
        return torch.repeat_interleave(torch.arange(self.out_channels, device=counts.device), counts)

    def codes(self) -> torch.Tensor:
        """The unpacked code of every nonzero, int64 [nnz] (quantized kinds only)."""
        if self.value_kind not in ("linear", "codebook"):
            raise ValueError(f"codes: value_kind {self.value_kind!r} stores no codes")
        return unpack_codes(self.values, self.bits, self.nnz)

    def nonzero_values(self) -> torch.Tensor:
        """The fp32 value of every nonzero, decoded exactly as the kernels do."""
        if self.value_kind in ("float32", "float16"):
            return self.values.to(torch.float32)
        codes = self.codes()
        if self.value_kind == "codebook":
            return self.codebook[self.rows(), codes] if self.codebook.dim() == 2 else self.codebook[codes]
        rows = self.rows()
        return self.scale[rows] * (codes - self.zero_point[rows].to(torch.int64)).to(torch.float32)

    def dequantize(self) -> torch.Tensor:
        """The dense fp32 weight, shaped like the original."""
        dense = torch.zeros(self.out_channels * self.row_length, dtype=torch.float32, device=self.values.device)
        flat = self.rows() * self.row_length + self.columns()
        dense[flat] = self.nonzero_values()
        return dense.reshape(self.weight_shape)

    # -- sizes ------------------------------------------------------------------------
    def tensors(self) -> Dict[str, torch.Tensor]:
        out = {}
        for name in _TENSOR_FIELDS:
            t = getattr(self, name)
            if t is not None:
                out[name] = t
        return out

    def footprint_bytes(self) -> int:
        """The compressed weight: indices, row pointers and order, values/codes, scales, codebook, bias."""
        return sum(t.numel() * t.element_size() for name, t in self.tensors().items() if name not in _TILE_FIELDS)

    def tile_bytes(self) -> int:
        """The tensor-core tiles stored beside the CSR (0 without them)."""
        return sum(t.numel() * t.element_size() for name, t in self.tensors().items() if name in _TILE_FIELDS)

    @property
    def has_tiles(self) -> bool:
        return self.tile_kptr is not None

    @property
    def tile_groups(self) -> int:
        return self.tile_kptr.numel() - 1 if self.tile_kptr is not None else 0

    def mask(self) -> torch.Tensor:
        """The nonzero pattern as a dense bool [C_out, C_in*KH*KW] (on the layer's device)."""
        m = torch.zeros(self.out_channels, self.row_length, dtype=torch.bool, device=self.rowptr.device)
        m[self.rows(), self.columns()] = True
        return m

    def with_tiles(self, by_similarity: bool = True) -> "PackedLayer":
        """This layer with its tensor-core tiles (re)built from its nonzero pattern (on the CPU)."""
        rows, kptr, cols = build_tiles(self.mask().cpu(), by_similarity)
        dev = self.rowptr.device
        built = dataclasses.replace(
            self, tile_rows=rows.to(dev), tile_kptr=kptr.to(dev), tile_cols=index_tensor(cols, self.row_length).to(dev)
        )
        built._row_nnz_max = self._row_nnz_max
        return built

    def dense_bytes(self) -> int:
        """The fp32 dense weight plus the fp32 bias."""
        n = self.out_channels * self.row_length
        return 4 * (n + (self.out_channels if self.bias is not None else 0))

    def to(self, device) -> "PackedLayer":
        moved = dataclasses.replace(self, **{name: t.to(device) for name, t in self.tensors().items()})
        moved._row_nnz_max = self.row_nnz_max
        return moved

    def geometry(self) -> Dict[str, Any]:
        return {
            "kind": self.kind,
            "weight_shape": list(self.weight_shape),
            "stride": self.stride,
            "padding": self.padding,
            "value_kind": self.value_kind,
            "bits": self.bits,
            "index_bits": self.index_bits,
            "nnz": self.nnz,
        }


# ---------------------------------------------------------------------------------------
# bit packing


# ---------------------------------------------------------------------------------------
# building


def _per_row(t, name: str, rows: int, dtype) -> torch.Tensor:
    t = torch.as_tensor(t).detach().cpu()
    if t.numel() == 1:
        t = t.reshape(1).expand(rows)
    if t.dim() != 1 or t.numel() != rows:
        raise ValueError(
            f"{name}: expected a scalar or {rows} values (one per output channel), got shape {tuple(t.shape)}"
        )
    return t.to(dtype).contiguous()


def pack_weight(
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    stride: int = 1,
    padding: int = 0,
    bits: Optional[int] = None,
    codes: Optional[torch.Tensor] = None,
    scale=None,
    zero_point=None,
    codebook: Optional[torch.Tensor] = None,
    value_dtype: torch.dtype = torch.float32,
    sort_rows: bool = True,
    tiles: bool = True,
) -> PackedLayer:
    """Pack a dense conv2d [C_out, C_in, KH, KW] or linear [out, in] weight; only nonzeros are stored.

    Float values: leave ``bits`` None (``value_dtype`` fp32 or fp16). Codes: give ``bits`` (8/4/2) and an
    integer ``codes`` tensor shaped like ``weight`` plus either ``scale`` (+ optional integer
    ``zero_point``; scalars mean per-tensor) or a ``codebook`` of at most 2**bits levels ([levels] for
    the layer, or [C_out, levels]: one per output channel). ``tiles`` adds the tensor-core tiles. Signed codes are
    shifted into the unsigned range (zero point shifted alike, values unchanged). The stored positions
    are those whose decoded value is nonzero; a zero weight whose code decodes to nonzero is refused.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4):
        raise ValueError(
            f"weight: expected a 4-D conv2d or 2-D linear tensor, got "
            f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}"
        )
    if not weight.is_floating_point():
        raise ValueError(f"weight: expected a floating-point tensor, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"weight: shape {tuple(weight.shape)} has an empty dimension (no channels or no kernel)")
    kind = "conv2d" if weight.dim() == 4 else "linear"
    if kind == "linear" and (stride != 1 or padding != 0):
        raise ValueError("stride/padding: a linear layer takes stride=1 and padding=0")
    if int(stride) < 1 or int(padding) < 0:
        raise ValueError(f"stride/padding: expected stride >= 1 and padding >= 0, got {stride} and {padding}")
    w = weight.detach().to("cpu", torch.float32)
    if not torch.isfinite(w).all():
        raise ValueError("weight: contains NaN or Inf")
    rows = w.shape[0]
    w2 = w.reshape(rows, -1)

    scale_t = zp_t = codebook_t = None
    if bits is None:
        if codes is not None or scale is not None or codebook is not None or zero_point is not None:
            raise ValueError("bits: give bits (8, 4 or 2) together with codes/scale/zero_point/codebook")
        if value_dtype not in (torch.float32, torch.float16):
            raise ValueError(f"value_dtype: expected torch.float32 or torch.float16, got {value_dtype}")
        value_kind, stored_bits = ("float32", 32) if value_dtype == torch.float32 else ("float16", 16)
        mask = w2 != 0
        decoded = w2
    else:
        if bits not in CODE_BITS:
            raise ValueError(f"bits: expected one of {CODE_BITS} or None, got {bits!r}")
        if codes is None:
            raise ValueError("codes: required when bits is given (an integer tensor shaped like weight)")
        codes = torch.as_tensor(codes).detach().cpu()
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"codes: expected an integer tensor, got {codes.dtype}")
        if tuple(codes.shape) != tuple(weight.shape):
            raise ValueError(f"codes: expected shape {tuple(weight.shape)} like weight, got {tuple(codes.shape)}")
        c = codes.to(torch.int64).reshape(rows, -1)
        if (scale is None) == (codebook is None):
            raise ValueError(
                "scale/codebook: give exactly one (scale [+ zero_point] for linear codes, codebook for levels)"
            )
        if scale is not None:
            value_kind = "linear"
            scale_t = _per_row(scale, "scale", rows, torch.float32)
            if not torch.isfinite(scale_t).all():
                raise ValueError("scale: contains NaN or Inf")
            zp = _per_row(0 if zero_point is None else zero_point, "zero_point", rows, torch.float64)
            if not torch.equal(zp, zp.round()):
                raise ValueError("zero_point: expected integers")
            zp64 = zp.to(torch.int64)
            if int(c.min()) < 0:  # signed codes: shift into [0, 2**bits)
                c = c + (1 << (bits - 1))
                zp64 = zp64 + (1 << (bits - 1))
            zp_t = zp64.to(torch.int32)
            decoded = scale_t[:, None] * (c - zp64[:, None]).to(torch.float32)
        else:
            value_kind = "codebook"
            if zero_point is not None:
                raise ValueError("zero_point: only used with scale (linear codes), not with a codebook")
            codebook_t = torch.as_tensor(codebook).detach().cpu().to(torch.float32).contiguous()
            per_row = codebook_t.dim() == 2
            if codebook_t.dim() > 2 or (per_row and codebook_t.shape[0] != rows):
                raise ValueError(
                    f"codebook: expected [levels] (one for the layer) or [{rows}, levels] (one per "
                    f"output channel), got shape {tuple(codebook_t.shape)}"
                )
            codebook_t = codebook_t if per_row else codebook_t.flatten()
            n_levels = codebook_t.shape[-1]
            if n_levels == 0 or n_levels > (1 << bits):
                raise ValueError(f"codebook: expected 1..{1 << bits} levels for {bits} bits, got {n_levels}")
            if not torch.isfinite(codebook_t).all():
                raise ValueError("codebook: contains NaN or Inf")
            if int(c.min()) < 0 or int(c.max()) >= n_levels:
                raise ValueError(
                    f"codes: expected codebook indices in [0, {n_levels}), got [{int(c.min())}, {int(c.max())}]"
                )
            decoded = codebook_t.gather(1, c) if per_row else codebook_t[c]
        if int(c.min()) < 0 or int(c.max()) >= (1 << bits):
            raise ValueError(
                f"codes: expected values in [0, {1 << bits}) (or signed [-{1 << (bits - 1)}, "
                f"{1 << (bits - 1)})) for {bits} bits, got [{int(c.min())}, {int(c.max())}]"
            )
        mask = decoded != 0
        bad = int((mask & (w2 == 0)).sum())
        if bad:
            raise ValueError(
                f"codes: {bad} pruned (zero) weights have codes that decode to nonzero values; "
                "pruned positions must decode to exactly 0"
            )
        value_kind, stored_bits = value_kind, bits

    counts = mask.sum(dim=1)
    rowptr = torch.zeros(rows + 1, dtype=torch.int64)
    rowptr[1:] = torch.cumsum(counts, 0)
    if int(rowptr[-1]) >= 2**31:
        raise ValueError("weight: more than 2**31 nonzeros do not fit the int32 row pointers")
    r_idx, cols = mask.nonzero(as_tuple=True)  # row-major, so columns come sorted within each row
    ncols = w2.shape[1]
    colidx = index_tensor(cols, ncols)
    if value_kind == "float32":
        values = decoded[r_idx, cols].contiguous()
    elif value_kind == "float16":
        values = decoded[r_idx, cols].to(torch.float16).contiguous()
    else:
        values = pack_codes(c[r_idx, cols], bits)
    order = (torch.argsort(counts, descending=True, stable=True) if sort_rows else torch.arange(rows)).to(torch.int32)
    bias_t = None
    if bias is not None:
        bias_t = _per_row(bias, "bias", rows, torch.float32)
        if bias_t.numel() != rows:
            raise ValueError(f"bias: expected {rows} values, got {bias_t.numel()}")
    tile_rows = tile_kptr = tile_cols = None
    if tiles:
        tile_rows, tile_kptr, cols64 = build_tiles(mask)
        tile_cols = index_tensor(cols64, ncols)
    return PackedLayer(
        kind=kind,
        weight_shape=tuple(int(s) for s in weight.shape),
        stride=int(stride),
        padding=int(padding),
        value_kind=value_kind,
        bits=stored_bits,
        rowptr=rowptr.to(torch.int32),
        colidx=colidx.contiguous(),
        row_order=order.contiguous(),
        values=values,
        scale=scale_t,
        zero_point=zp_t,
        codebook=codebook_t,
        bias=bias_t,
        tile_rows=tile_rows,
        tile_kptr=tile_kptr,
        tile_cols=tile_cols,
    )


# ---------------------------------------------------------------------------------------
# consistency checks (shared by load and by the ops' validation)


def expected_shapes(layer: PackedLayer) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """The shape and dtype each stored tensor must have, from the geometry alone (nnz from colidx)."""
    rows, nnz = layer.out_channels, layer.nnz
    idx_dtype = torch.int16 if layer.row_length <= INDEX16_LIMIT else torch.int32
    exp = {"rowptr": ((rows + 1,), torch.int32), "colidx": ((nnz,), idx_dtype), "row_order": ((rows,), torch.int32)}
    if layer.value_kind == "float32":
        exp["values"] = ((nnz,), torch.float32)
    elif layer.value_kind == "float16":
        exp["values"] = ((nnz,), torch.float16)
    else:
        exp["values"] = (((nnz * layer.bits + 7) // 8,), torch.uint8)
    if layer.value_kind == "linear":
        exp["scale"] = ((rows,), torch.float32)
        exp["zero_point"] = ((rows,), torch.int32)
    if layer.value_kind == "codebook":  # [levels] for the layer, or [rows, levels]: one per output channel
        book = layer.codebook if layer.codebook is not None else torch.empty(0)
        exp["codebook"] = ((rows, book.shape[-1]) if book.dim() == 2 else (book.numel(),), torch.float32)
    if layer.bias is not None:
        exp["bias"] = ((rows,), torch.float32)
    return exp


def check_layer(layer: PackedLayer, name: str = "layer") -> None:
    """Raise ValueError naming the layer and tensor when the layer is inconsistent (no data checks on GPU)."""
    if layer.kind not in ("conv2d", "linear"):
        raise ValueError(f"{name}: kind must be 'conv2d' or 'linear', got {layer.kind!r}")
    if len(layer.weight_shape) != (4 if layer.kind == "conv2d" else 2):
        raise ValueError(f"{name}: weight_shape {layer.weight_shape} does not fit kind {layer.kind!r}")
    if any(int(d) < 1 for d in layer.weight_shape):
        raise ValueError(
            f"{name}: weight_shape {tuple(layer.weight_shape)}: every dimension must be >= 1 (a layer "
            "without input or output channels, or with an empty kernel, computes nothing)"
        )
    if layer.value_kind not in VALUE_KINDS:
        raise ValueError(f"{name}: value_kind must be one of {VALUE_KINDS}, got {layer.value_kind!r}")
    want_bits = {"float32": (32,), "float16": (16,)}.get(layer.value_kind, CODE_BITS)
    if layer.bits not in want_bits:
        raise ValueError(
            f"{name}: bits must be one of {want_bits} for value_kind {layer.value_kind!r}, got {layer.bits}"
        )
    if layer.value_kind == "codebook" and (
        layer.codebook is None
        or layer.codebook.dim() not in (1, 2)
        or not 0 < layer.codebook.shape[-1] <= 1 << layer.bits
    ):
        raise ValueError(
            f"{name}.codebook: expected [levels] or [{layer.out_channels}, levels] (one per output "
            f"channel) with 1..{1 << layer.bits} levels"
        )
    for tname, (shape, dtype) in expected_shapes(layer).items():
        t = getattr(layer, tname)
        if t is None:
            raise ValueError(f"{name}.{tname}: missing (value_kind {layer.value_kind!r} needs it)")
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(
                f"{name}.{tname}: expected shape {shape} and dtype {dtype}, got {tuple(t.shape)} {t.dtype}"
            )
    for tname in ("scale", "zero_point", "codebook"):
        if getattr(layer, tname) is not None and tname not in expected_shapes(layer):
            raise ValueError(f"{name}.{tname}: not used by value_kind {layer.value_kind!r}; leave it None")
    tiles = [getattr(layer, t) is not None for t in _TILE_FIELDS]
    if any(tiles) and not all(tiles):
        raise ValueError(f"{name}: tile_rows, tile_kptr and tile_cols go together (all or none)")
    if all(tiles):
        groups = -(-layer.out_channels // 16)
        idx_dtype = torch.int16 if layer.row_length <= INDEX16_LIMIT else torch.int32
        for tname, shape, dtype in (
            ("tile_rows", (groups * 16,), torch.int32),
            ("tile_kptr", (groups + 1,), torch.int32),
            ("tile_cols", (layer.tile_cols.numel(),), idx_dtype),
        ):
            t = getattr(layer, tname)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(
                    f"{name}.{tname}: expected shape {shape} and dtype {dtype}, got {tuple(t.shape)} {t.dtype}"
                )


def check_layer_data(layer: PackedLayer, name: str = "layer") -> None:
    """Data checks that need the values (done on load, on the CPU): pointers, index ranges, sortedness."""
    rp = layer.rowptr.to(torch.int64)
    if int(rp[0]) != 0 or int(rp[-1]) != layer.nnz or bool((rp[1:] < rp[:-1]).any()):
        raise ValueError(f"{name}.rowptr: must start at 0, be non-decreasing and end at nnz={layer.nnz}")
    if layer.nnz:
        cols = layer.columns()
        if int(cols.min()) < 0 or int(cols.max()) >= layer.row_length:
            raise ValueError(f"{name}.colidx: column indices outside [0, {layer.row_length})")
        rows = layer.rows()
        same_row = rows[1:] == rows[:-1]
        if bool((same_row & (cols[1:] <= cols[:-1])).any()):
            raise ValueError(f"{name}.colidx: columns must be strictly increasing within each row")
    order = layer.row_order.to(torch.int64)
    if not torch.equal(torch.sort(order).values, torch.arange(layer.out_channels)):
        raise ValueError(f"{name}.row_order: must be a permutation of 0..{layer.out_channels - 1}")
    if layer.value_kind == "codebook" and layer.nnz and int(layer.codes().max()) >= layer.codebook.shape[-1]:
        raise ValueError(f"{name}.values: codes index past the {layer.codebook.shape[-1]}-level codebook")
    if layer.has_tiles:
        check_tiles(layer, name)


def check_tiles(layer: PackedLayer, name: str = "layer") -> None:
    """The tiles must hold every channel once and, per group, sorted taps covering its channels' nonzeros."""
    rows = layer.tile_rows.to(torch.int64)
    live = rows[rows >= 0]
    if not torch.equal(torch.sort(live).values, torch.arange(layer.out_channels)) or bool((rows < -1).any()):
        raise ValueError(
            f"{name}.tile_rows: must hold each output channel 0..{layer.out_channels - 1} once, -1 elsewhere"
        )
    kptr = layer.tile_kptr.to(torch.int64)
    if (
        int(kptr[0]) != 0
        or int(kptr[-1]) != layer.tile_cols.numel()
        or bool((kptr[1:] < kptr[:-1]).any())
        or bool((kptr % TILE_K != 0).any())
    ):
        raise ValueError(
            f"{name}.tile_kptr: must start at 0, rise in multiples of {TILE_K} and end at "
            f"len(tile_cols)={layer.tile_cols.numel()}"
        )
    cols = unsigned(layer.tile_cols)
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= layer.row_length):
        raise ValueError(f"{name}.tile_cols: column indices outside [0, {layer.row_length})")
    group = torch.repeat_interleave(torch.arange(kptr.numel() - 1), kptr[1:] - kptr[:-1])
    if bool(((group[1:] == group[:-1]) & (cols[1:] < cols[:-1])).any()):
        raise ValueError(f"{name}.tile_cols: taps must be ascending within each group")
    if layer.nnz:
        slot_group = torch.empty(layer.out_channels, dtype=torch.int64)
        slot_group[live] = torch.nonzero(rows >= 0).flatten() // TILE_ROWS
        g = slot_group[layer.rows()]
        key = group * layer.row_length + cols
        want = g * layer.row_length + layer.columns()
        pos = torch.searchsorted(key, want).clamp_max(max(0, key.numel() - 1))
        if key.numel() == 0 or not torch.equal(key[pos], want):
            raise ValueError(f"{name}.tile_cols: a nonzero's column is missing from its group's taps")


# ---------------------------------------------------------------------------------------
# files


def _digest(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def _geometry_digest(entry: Dict[str, Any]) -> str:
    """SHA-256 of a layer's geometry as the metadata records it (kind, shape, stride, padding, values, nnz)."""
    fields = {k: entry.get(k) for k in _GEOMETRY_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def save_packed(path, layers: Dict[str, PackedLayer], metadata: Optional[Dict[str, Any]] = None) -> None:
    """Write layers to a safetensors file with JSON metadata (geometry + SHA-256 per tensor), atomically."""
    tensors: Dict[str, torch.Tensor] = {}
    index: Dict[str, Any] = {}
    for name, layer in layers.items():
        if "/" in name:
            raise ValueError(f"layers: name {name!r} must not contain '/'")
        check_layer(layer, name)
        entry = layer.geometry()
        entry["geometry_sha256"] = _geometry_digest(entry)
        entry["sha256"] = {}
        for tname, t in layer.tensors().items():
            t = t.detach().cpu().contiguous()
            tensors[f"{name}/{tname}"] = t
            entry["sha256"][tname] = _digest(t)
        index[name] = entry
    meta = {
        "format": "sparsebench.packed",
        "version": FORMAT_VERSION,
        "layers": json.dumps(index),
        "metadata": json.dumps(metadata or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_packed(path) -> Tuple[Dict[str, PackedLayer], Dict[str, Any]]:
    """Read a file written by save_packed; ValueError naming the layer/tensor on any mismatch or corruption."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated/garbled headers
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != "sparsebench.packed":
        raise ValueError(f"{path}: not a sparsebench packed file (metadata 'format' is {meta.get('format')!r})")
    if meta.get("version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{path}: packed format version {meta.get('version')!r}, this code reads {', '.join(READABLE_VERSIONS)}"
        )
    try:
        index = json.loads(meta["layers"])
        user_meta = json.loads(meta.get("metadata", "{}"))
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: metadata is damaged ({e})") from None

    layers: Dict[str, PackedLayer] = {}
    if not isinstance(index, dict):
        raise ValueError(f"{path}: metadata is damaged (its layer index is not a mapping)")
    for name, entry in index.items():
        try:
            layers[name] = _load_layer(path, name, entry, stored, meta["version"])
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: layer {name!r}: metadata is damaged ({type(e).__name__}: {e})") from None
    if stored:
        raise ValueError(f"{path}: tensors not described by the metadata: {sorted(stored)[:5]}")
    return layers, user_meta


def _load_layer(
    path: Path, name: str, entry: Dict[str, Any], stored: Dict[str, torch.Tensor], version: str
) -> PackedLayer:
    """One layer of a packed file, every checksum verified (the geometry's too, from version 2 on)."""
    if version != "1" and entry.get("geometry_sha256") != _geometry_digest(entry):
        raise ValueError(
            f"{path}: layer {name!r}: its geometry (shape, stride, padding, values) fails its checksum "
            "(file corrupted or edited)"
        )
    parts = {}
    for tname, digest in entry["sha256"].items():
        key = f"{name}/{tname}"
        if key not in stored:
            raise ValueError(f"{path}: layer {name!r} tensor {tname!r} is missing")
        t = stored.pop(key)
        if _digest(t) != digest:
            raise ValueError(f"{path}: layer {name!r} tensor {tname!r} fails its checksum (file corrupted)")
        parts[tname] = t
    try:
        layer = PackedLayer(
            kind=entry["kind"],
            weight_shape=tuple(entry["weight_shape"]),
            stride=entry["stride"],
            padding=entry["padding"],
            value_kind=entry["value_kind"],
            bits=entry["bits"],
            **parts,
        )
    except TypeError as e:
        raise ValueError(f"{path}: layer {name!r} is incomplete ({e})") from None
    check_layer(layer, name)
    if layer.nnz != entry["nnz"]:
        raise ValueError(f"{path}: layer {name!r} has {layer.nnz} nonzeros, metadata says {entry['nnz']}")
    check_layer_data(layer, name)
    return layer if layer.has_tiles else layer.with_tiles()
