"""Sparse conv2d / linear over a PackedLayer: validation, the CUDA kernels, a PyTorch reference.

``sparse_conv2d`` and ``sparse_linear`` check every tensor (ValueError naming it) and then call the
``sparsebench::sparse_conv2d`` / ``sparsebench::sparse_linear`` custom ops, which launch the
``sparsebench._C`` kernels on the current stream without syncing or allocating (beyond the output),
so they work under CUDA graphs and torch.compile. With ``set_autotune(True)`` a layer's first call on a
new input shape first times the candidate plans (that call syncs; see ``autotune_plan``).
``reference_conv2d`` / ``reference_linear`` compute the same thing with dequantize + F.conv2d /
F.linear, on any device.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from sparsebench.errors import ConfigError
from sparsebench.sparse.format import PackedLayer, check_layer
from sparsebench.sparse.pairs import PAIR_K, pair_stream
from sparsebench.sparse.split import SPLIT, split_stream
from sparsebench.sparse.tiles import TILE_K, TILE_ROWS, FragmentStream, fragment_stream, stream_kind, tap_code_dtype
from sparsebench.sparse.timing import time_cuda

try:  # the compiled module is optional: CPU-only installs have none
    from sparsebench import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: Optional[str] = None
except ImportError as e:  # pragma: no cover - depends on the build
    _C = None
    _IMPORT_ERROR = str(e)

ACT_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
VALUE_KIND_CODES = {"float32": 0, "float16": 1, "linear": 2, "codebook": 3}
VARIANTS = {"auto": 0, "stage": 1, "rowsplit": 2, "tensor": 3}


def kernels_unavailable_reason() -> Optional[str]:
    """None when the kernels can run here, else why not."""
    if _C is None:
        return f"sparsebench._C is not built or failed to import ({_IMPORT_ERROR})"
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    return None


def kernels_available() -> bool:
    return kernels_unavailable_reason() is None


def require_kernels() -> None:
    """Raise the one-line user error when the direct_sparse backend cannot run here."""
    reason = kernels_unavailable_reason()
    if reason:
        raise ConfigError(
            "backend direct_sparse needs a CUDA GPU and the compiled sparsebench._C module; "
            f"{reason} (install on a machine with nvcc: pip install -e .)"
        )


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


# ---------------------------------------------------------------------------------------
# validation


def _check_x(x, layer: PackedLayer, dims: int, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dims:
        raise ValueError(f"{name}: expected a {dims}-D tensor, got shape {tuple(x.shape)}")
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"{name}: dtype must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[1] != layer.in_channels:
        raise ValueError(f"{name}: has {x.shape[1]} channels/features, the layer expects {layer.in_channels}")


def is_channels_last(x: torch.Tensor) -> bool:
    """A 4-D tensor laid out NHWC (and not also NCHW-contiguous, as a 1x1 image or one channel is)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _check_device(x: torch.Tensor, layer: PackedLayer, name: str = "x") -> None:
    if x.device.type != "cuda":
        raise ValueError(
            f"{name}: must be on a CUDA device for the sparse kernels, got {x.device} "
            "(use reference_conv2d/reference_linear on the CPU)"
        )
    if not (x.is_contiguous() or is_channels_last(x)):
        raise ValueError(f"{name}: must be contiguous (NCHW / row-major) or channels_last; call .contiguous() first")
    if x.numel() >= 2**31:
        raise ValueError(f"{name}: {x.numel()} elements; the kernels take fewer than 2**31")
    for tname, t in layer.tensors().items():
        if t.device != x.device:
            raise ValueError(f"layer.{tname}: on {t.device}, expected {x.device} like {name} (call layer.to(x.device))")
        if not t.is_contiguous():
            raise ValueError(f"layer.{tname}: must be contiguous")


def _check_layer_and_x(x: torch.Tensor, layer: PackedLayer, kind: str, dims: int) -> None:
    """The checks both ops share: a consistent packed layer of ``kind``, and an input that fits it."""
    if not isinstance(layer, PackedLayer):
        raise ValueError(f"layer: expected a PackedLayer, got {type(layer).__name__}")
    if layer.kind != kind:
        raise ValueError(f"layer: sparse_{kind} needs a {kind} layer, got kind {layer.kind!r}")
    check_layer(layer, "layer")
    _check_x(x, layer, dims)


def validate_conv2d(x: torch.Tensor, layer: PackedLayer, *, device: bool = True) -> None:
    """All checks sparse_conv2d makes before the kernel call (no device sync, no data reads);
    ``device=False`` leaves out the device/contiguity checks."""
    _check_layer_and_x(x, layer, "conv2d", 4)
    _, _, kh, kw = layer.weight_shape
    oh = conv_output_size(x.shape[2], kh, layer.stride, layer.padding)
    ow = conv_output_size(x.shape[3], kw, layer.stride, layer.padding)
    if oh < 1 or ow < 1:
        raise ValueError(
            f"x: input {tuple(x.shape[2:])} is smaller than the {kh}x{kw} kernel with padding {layer.padding}"
        )
    if device:
        _check_device(x, layer)
    if x.shape[0] * layer.out_channels * oh * ow >= 2**31:
        raise ValueError("x: the output would have 2**31 or more elements; split the batch")


def validate_linear(x: torch.Tensor, layer: PackedLayer, *, device: bool = True) -> None:
    _check_layer_and_x(x, layer, "linear", 2)
    if device:
        _check_device(x, layer)
    if x.shape[0] * layer.out_channels >= 2**31:
        raise ValueError("x: the output would have 2**31 or more elements; split the batch")


# ---------------------------------------------------------------------------------------
# custom ops


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _codebook_stride(codebook: Optional[torch.Tensor]) -> int:
    """Levels between one output channel's codebook and the next's: 0 when the layer has one codebook."""
    return codebook.shape[-1] if codebook is not None and codebook.dim() == 2 else 0


def _index_bits(t: torch.Tensor) -> int:
    return 16 if t.dtype == torch.int16 else 32


class _Weights(NamedTuple):
    """A packed layer's tensors as the kernels take them (the custom ops' tensor arguments, in order)."""

    rowptr: torch.Tensor
    colidx: torch.Tensor
    row_order: torch.Tensor
    values: torch.Tensor
    scale: Optional[torch.Tensor]
    zero_point: Optional[torch.Tensor]
    codebook: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    tile_rows: Optional[torch.Tensor]
    tile_kptr: Optional[torch.Tensor]
    tile_cols: Optional[torch.Tensor]  # the taps as the kernels read them: tiles.tap_codes
    tc_values: Optional[torch.Tensor]
    tc_codebook: Optional[torch.Tensor]


def _conv_args(
    x: torch.Tensor,
    out: torch.Tensor,
    geometry: Tuple[int, ...],
    w: _Weights,
    *,
    value_kind: int,
    bits: int,
    tc_kind: int,
    relu: bool,
    variant: int,
    max_row: int,
    plan: int,
    pairs: int = 0,
):
    """The kernels' ConvArgs for one call: x and out's pointers and layout, the weights, the hints."""
    n, c, h, wd, co, kh, kw, stride, pad, oh, ow = geometry
    a = _C.ConvArgs()
    a.x, a.out = x.data_ptr(), out.data_ptr()
    a.act_dtype, a.layout = ACT_DTYPES[x.dtype], int(is_channels_last(x))
    a.N, a.C, a.H, a.W, a.CO, a.KH, a.KW = n, c, h, wd, co, kh, kw
    a.stride, a.pad, a.OH, a.OW = stride, pad, oh, ow
    a.rowptr, a.colidx, a.col_bits = w.rowptr.data_ptr(), w.colidx.data_ptr(), _index_bits(w.colidx)
    a.row_order, a.values, a.value_kind, a.bits = w.row_order.data_ptr(), w.values.data_ptr(), value_kind, bits
    a.scale, a.zero_point, a.codebook = _ptr(w.scale), _ptr(w.zero_point), _ptr(w.codebook)
    a.codebook_stride, a.bias, a.relu = _codebook_stride(w.codebook), _ptr(w.bias), int(relu)
    if w.tile_rows is not None and w.tc_values is not None:  # the split stream has no taps of its own
        a.tile_rows, a.tile_kptr, a.tile_cols = w.tile_rows.data_ptr(), _ptr(w.tile_kptr), _ptr(w.tile_cols)
        a.groups = w.tile_rows.numel() // TILE_ROWS
        if w.tile_cols is not None:
            a.tile_col_bits = _index_bits(w.tile_cols)
            a.tile_steps = w.tile_cols.numel() // (PAIR_K if pairs else TILE_K)
        a.tc_values, a.tc_kind, a.tc_pairs = w.tc_values.data_ptr(), tc_kind, pairs
        a.tc_codebook, a.tc_codebook_stride = _ptr(w.tc_codebook), _codebook_stride(w.tc_codebook)
    a.variant, a.nnz, a.max_row, a.plan = variant, w.colidx.numel(), max_row, plan
    return a


def _launch(x: torch.Tensor, out: torch.Tensor, geometry: Tuple[int, ...], w: _Weights, **hints) -> None:
    if out.numel() == 0:
        return
    _C.conv2d(_conv_args(x, out, geometry, w, **hints), torch.cuda.current_stream(x.device).cuda_stream)


def _empty_out(x: torch.Tensor, shape) -> torch.Tensor:
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


@torch.library.custom_op("sparsebench::sparse_conv2d", mutates_args=())
def _sparse_conv2d_op(
    x: torch.Tensor,
    rowptr: torch.Tensor,
    colidx: torch.Tensor,
    row_order: torch.Tensor,
    values: torch.Tensor,
    scale: Optional[torch.Tensor],
    zero_point: Optional[torch.Tensor],
    codebook: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    tile_rows: Optional[torch.Tensor],
    tile_kptr: Optional[torch.Tensor],
    tile_cols: Optional[torch.Tensor],
    tc_values: Optional[torch.Tensor],
    tc_codebook: Optional[torch.Tensor],
    weight_shape: List[int],
    stride: int,
    padding: int,
    value_kind: int,
    bits: int,
    tc_kind: int,
    relu: bool,
    variant: int,
    max_row: int,
    plan: int,
    pairs: int,
) -> torch.Tensor:
    n, c, h, w = x.shape
    co, _, kh, kw = weight_shape
    oh, ow = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    out = _empty_out(x, (n, co, oh, ow))
    weights = _Weights(
        rowptr,
        colidx,
        row_order,
        values,
        scale,
        zero_point,
        codebook,
        bias,
        tile_rows,
        tile_kptr,
        tile_cols,
        tc_values,
        tc_codebook,
    )
    with torch.cuda.device(x.device):
        _launch(
            x,
            out,
            (n, c, h, w, co, kh, kw, stride, padding, oh, ow),
            weights,
            value_kind=value_kind,
            bits=bits,
            tc_kind=tc_kind,
            relu=relu,
            variant=variant,
            max_row=max_row,
            plan=plan,
            pairs=pairs,
        )
    return out


@_sparse_conv2d_op.register_fake
def _(
    x,
    rowptr,
    colidx,
    row_order,
    values,
    scale,
    zero_point,
    codebook,
    bias,
    tile_rows,
    tile_kptr,
    tile_cols,
    tc_values,
    tc_codebook,
    weight_shape,
    stride,
    padding,
    value_kind,
    bits,
    tc_kind,
    relu,
    variant,
    max_row,
    plan,
    pairs,
):
    n, _, h, w = x.shape
    co, _, kh, kw = weight_shape
    return _empty_out(x, (n, co, conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)))


@torch.library.custom_op("sparsebench::sparse_linear", mutates_args=())
def _sparse_linear_op(
    x: torch.Tensor,
    rowptr: torch.Tensor,
    colidx: torch.Tensor,
    row_order: torch.Tensor,
    values: torch.Tensor,
    scale: Optional[torch.Tensor],
    zero_point: Optional[torch.Tensor],
    codebook: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    tile_rows: Optional[torch.Tensor],
    tile_kptr: Optional[torch.Tensor],
    tile_cols: Optional[torch.Tensor],
    tc_values: Optional[torch.Tensor],
    tc_codebook: Optional[torch.Tensor],
    out_features: int,
    value_kind: int,
    bits: int,
    tc_kind: int,
    relu: bool,
    variant: int,
    max_row: int,
    plan: int,
    pairs: int,
) -> torch.Tensor:
    b, c = x.shape
    out = torch.empty((b, out_features), dtype=x.dtype, device=x.device)
    weights = _Weights(
        rowptr,
        colidx,
        row_order,
        values,
        scale,
        zero_point,
        codebook,
        bias,
        tile_rows,
        tile_kptr,
        tile_cols,
        tc_values,
        tc_codebook,
    )
    with torch.cuda.device(x.device):
        _launch(
            x,
            out,
            (b, c, 1, 1, out_features, 1, 1, 1, 0, 1, 1),
            weights,
            value_kind=value_kind,
            bits=bits,
            tc_kind=tc_kind,
            relu=relu,
            variant=variant,
            max_row=max_row,
            plan=plan,
            pairs=pairs,
        )
    return out


@_sparse_linear_op.register_fake
def _(
    x,
    rowptr,
    colidx,
    row_order,
    values,
    scale,
    zero_point,
    codebook,
    bias,
    tile_rows,
    tile_kptr,
    tile_cols,
    tc_values,
    tc_codebook,
    out_features,
    value_kind,
    bits,
    tc_kind,
    relu,
    variant,
    max_row,
    plan,
    pairs,
):
    return x.new_empty((x.shape[0], out_features))


def _max_row_hint(layer: PackedLayer) -> int:
    """The longest row for the dispatcher; 0 (unknown) rather than a device sync while capturing or compiling."""
    if layer._row_nnz_max is not None:
        return layer._row_nnz_max
    if layer.rowptr.is_cuda and (torch.compiler.is_compiling() or _capturing(layer.rowptr.device)):
        return 0
    return layer.row_nnz_max


def _variant_code(variant: str) -> int:
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {sorted(VARIANTS)}, got {variant!r}")
    return VARIANTS[variant]


def _tensor_capable(x: torch.Tensor, layer: PackedLayer) -> bool:
    """fp16/bf16 activations and a layer with tensor-core tiles."""
    return x.dtype in (torch.float16, torch.bfloat16) and layer.has_tiles


def _gemm_capable(x: torch.Tensor, layer: PackedLayer) -> bool:
    """Whether the implicit-GEMM kernel can run this call (cuda/dispatch.cu gemm_unsupported, which decides; where the
    two disagree the call stops with a tc_pairs mismatch): channels_last input or 1x1 images in and out (a linear
    layer), a multiple of 8 input channels, a 16-byte-aligned input, at most 2**25 weight places in its stream."""
    _, c, h, w, _, kh, kw, _, _, oh, ow = _geometry(x, layer)[0]
    places = layer.tile_rows.numel() * kh * kw * c
    one_by_one = h == w == oh == ow == 1
    aligned = torch.compiler.is_compiling() or x.data_ptr() % 16 == 0  # (a traced tensor has no address)
    return (is_channels_last(x) or one_by_one) and c % 8 == 0 and aligned and places <= 1 << 25


def _constant_to_compile(fn):
    """``torch.compiler.assume_constant_result`` without its import of torch._dynamo (over 2 s of every
    command's start): the marker it sets, which tests/test_dispatch.py checks against torch's."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_to_compile
def _plan_pairs(plan: int) -> int:
    """The groups a k-step of the 2:4 stream ``plan`` (-1: the rule) reads serves, 0 for the dense-MMA stream,
    SPLIT for the implicit-GEMM kernel's split stream; a constant to torch.compile, which cannot trace _C."""
    return int(_C.plan_pairs(plan))


def _stream(x: torch.Tensor, layer: PackedLayer, plan: int) -> Optional[FragmentStream]:
    """The tensor-core weight stream the call's plan reads (a candidate's kind, or the rule's knobs) for x's
    dtype: the dense-MMA one, the 2:4 one for the plan's groups a k-step, or the split one. Built on first use
    (it syncs, so never while a CUDA graph is captured or torch.compile traces: those calls then run the
    CUDA-core kernels)."""
    if not _tensor_capable(x, layer):
        return None
    pairs = _plan_pairs(plan)
    if pairs == SPLIT and not _gemm_capable(x, layer):
        pairs = 0  # the dispatcher runs the direct kernel on the dense-MMA stream instead
    key = (x.dtype, pairs)
    stream = layer.streams.get(key)
    if stream is None and not torch.compiler.is_compiling() and not (x.is_cuda and _capturing(x.device)):
        groups = key[1]
        if groups == SPLIT:
            stream = split_stream(layer, x.dtype)
        else:
            stream = pair_stream(layer, x.dtype, groups) if groups else fragment_stream(layer, x.dtype)
        layer.streams[key] = stream
    return stream


def _weights(layer: PackedLayer, stream: Optional[FragmentStream]) -> _Weights:
    tiles = (layer.tile_rows, stream.kptr, stream.taps) if stream is not None else (None, None, None)
    return _Weights(
        layer.rowptr,
        layer.colidx,
        layer.row_order,
        layer.values,
        layer.scale,
        layer.zero_point,
        layer.codebook,
        layer.bias,
        *tiles,
        stream.values if stream is not None else None,
        stream.codebook if stream is not None else None,
    )


def _hints(layer: PackedLayer, stream: Optional[FragmentStream], relu: bool, variant: int, plan: int) -> dict:
    return dict(
        value_kind=VALUE_KIND_CODES[layer.value_kind],
        bits=layer.bits,
        tc_kind=stream.kind if stream is not None else -1,
        relu=bool(relu),
        variant=variant,
        max_row=_max_row_hint(layer),
        plan=plan,
        pairs=stream.pairs if stream is not None else 0,
    )


def _geometry(x: torch.Tensor, layer: PackedLayer) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """The kernel's (N, C, H, W, CO, KH, KW, stride, pad, OH, OW) for ``x`` (a linear layer is a 1x1 conv on
    a 1x1 image) and the output shape."""
    if layer.kind == "linear":
        return (x.shape[0], x.shape[1], 1, 1, layer.out_channels, 1, 1, 1, 0, 1, 1), (x.shape[0], layer.out_channels)
    n, c, h, w = x.shape
    kh, kw = layer.kernel_size
    oh = conv_output_size(h, kh, layer.stride, layer.padding)
    ow = conv_output_size(w, kw, layer.stride, layer.padding)
    return (n, c, h, w, layer.out_channels, kh, kw, layer.stride, layer.padding, oh, ow), (
        n,
        layer.out_channels,
        oh,
        ow,
    )


def _launch_into(out: torch.Tensor, x: torch.Tensor, layer: PackedLayer, relu: bool, variant: int, plan: int) -> None:
    _launch_stream_into(out, x, layer, _stream(x, layer, plan), relu, variant, plan)


def _launch_stream_into(
    out: torch.Tensor,
    x: torch.Tensor,
    layer: PackedLayer,
    stream: Optional[FragmentStream],
    relu: bool,
    variant: int,
    plan: int,
) -> None:
    geometry, _ = _geometry(x, layer)
    with torch.cuda.device(x.device):
        _launch(x, out, geometry, _weights(layer, stream), **_hints(layer, stream, relu, variant, plan))


def _plan_and_stream(x: torch.Tensor, layer: PackedLayer, variant: str) -> Tuple[int, Optional[FragmentStream]]:
    """The call's plan and the tensor-core stream it reads. A channels_last call that the tensor cores cannot
    run goes to the CUDA-core kernels in NCHW, so it plans nothing here (it would time the wrong layout)."""
    plan = _call_plan(x, layer, variant) if _tensor_capable(x, layer) or not is_channels_last(x) else -1
    return plan, _stream(x, layer, plan)


def sparse_conv2d(x: torch.Tensor, layer: PackedLayer, relu: bool = False, *, variant: str = "auto") -> torch.Tensor:
    """Direct sparse convolution of ``x`` (fp32/fp16/bf16, CUDA, NCHW-contiguous or channels_last) with ``layer``;
    fp32 accumulation, bias and optional ReLU fused; output in x's dtype and memory format. fp16/bf16
    activations may run on the tensor cores (channels_last input only does)."""
    validate_conv2d(x, layer, device=False)
    require_kernels()
    _check_device(x, layer)
    plan, stream = _plan_and_stream(x, layer, variant)
    if is_channels_last(x) and (stream is None or variant in ("stage", "rowsplit")):  # the CUDA cores read NCHW
        y = sparse_conv2d(x.contiguous(), layer, relu, variant=variant)
        return y.contiguous(memory_format=torch.channels_last)
    return _sparse_conv2d_op(
        x,
        *_weights(layer, stream),
        list(layer.weight_shape),
        layer.stride,
        layer.padding,
        **_hints(layer, stream, relu, _variant_code(variant), plan),
    )


def sparse_linear(x: torch.Tensor, layer: PackedLayer, relu: bool = False, *, variant: str = "auto") -> torch.Tensor:
    """Sparse linear layer: ``x`` [batch, in_features] (CUDA, contiguous) -> [batch, out_features]."""
    validate_linear(x, layer, device=False)
    require_kernels()
    _check_device(x, layer)
    plan = _call_plan(x, layer, variant)
    stream = _stream(x, layer, plan)
    return _sparse_linear_op(
        x,
        *_weights(layer, stream),
        layer.out_channels,
        **_hints(layer, stream, relu, _variant_code(variant), plan),
    )


def _check_call(x: torch.Tensor, layer: PackedLayer) -> None:
    """The checks of a launch on ``x`` with a conv or linear ``layer``: the tensors, the kernels, the device."""
    if isinstance(layer, PackedLayer) and layer.kind == "linear":
        validate_linear(x, layer, device=False)
    else:
        validate_conv2d(x, layer, device=False)
    require_kernels()
    _check_device(x, layer)


def sparse_conv2d_into(
    out: torch.Tensor, x: torch.Tensor, layer: PackedLayer, relu: bool = False, *, variant: str = "auto"
) -> torch.Tensor:
    """Like sparse_conv2d (a linear layer takes x [batch, in]) but writes into the given ``out`` (in x's
    layout); the kernels write every element, so ``out`` may hold garbage (tests poison it with NaN)."""
    _check_call(x, layer)
    _, shape = _geometry(x, layer)
    nhwc = is_channels_last(x)
    plan, stream = _plan_and_stream(x, layer, variant)
    if nhwc and (stream is None or variant in ("stage", "rowsplit")):
        raise ValueError(
            "x: channels_last input runs on the tensor-core kernels only (fp16/bf16 activations, a "
            f"layer with tiles, variant 'auto' or 'tensor'); got {x.dtype}, variant {variant!r}"
        )
    fits = (
        isinstance(out, torch.Tensor)
        and tuple(out.shape) == shape
        and out.dtype == x.dtype
        and out.device == x.device
        and (out.is_contiguous(memory_format=torch.channels_last) if nhwc else out.is_contiguous())
    )
    if not fits:
        raise ValueError(
            f"out: expected a {'channels_last' if nhwc else 'contiguous'} {x.dtype} tensor of shape "
            f"{shape} on {x.device}"
        )
    _launch_stream_into(out, x, layer, stream, relu, _variant_code(variant), plan)
    return out


# ---------------------------------------------------------------------------------------
# plans and autotuning

_autotune = False


def set_autotune(enabled: bool) -> None:
    """Like ``torch.backends.cudnn.benchmark``: when on, a layer's first call on each new input shape
    times the dispatcher's candidate plans (``autotune_plan``: tens of milliseconds, with device syncs)
    and the layer keeps the fastest for later calls. Calls during CUDA graph capture never time: they
    use a plan already tuned for that shape, or the dispatcher's rule; under torch.compile the rule runs.
    The chosen plan can differ between runs (timing noise), and with it the fp32 summation order."""
    global _autotune
    _autotune = bool(enabled)


def autotune_enabled() -> bool:
    return _autotune


def _plan_key(x: torch.Tensor) -> tuple:
    return tuple(x.shape), x.dtype, x.device.index, is_channels_last(x)


def _capturing(device: torch.device) -> bool:
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def _call_plan(x: torch.Tensor, layer: PackedLayer, variant: str) -> int:
    """The candidate plan for this call: -1 (the rule) unless autotuning chose one for this input."""
    if variant != "auto" or torch.compiler.is_compiling():
        return -1
    plan = layer.tuned_plans.get(_plan_key(x))
    if plan is not None:
        return plan
    if not _autotune or _capturing(x.device):
        return -1
    return autotune_plan(x, layer)["plan"]


def _module(caller: str):
    """The compiled module, for what needs it but not a GPU (planning); a ConfigError without it."""
    if _C is None:
        raise ConfigError(f"{caller} needs the compiled sparsebench._C module; {_IMPORT_ERROR}")
    return _C


def plan_candidates() -> List[Dict[str, Any]]:
    """The plans the autotuner may pick, by id: the dispatcher's knobs, a few changed, and the kernel."""
    return list(_module("plan_candidates").plan_candidates())


def _planner(
    x_shape, layer: PackedLayer, variant: str = "auto", dtype: torch.dtype = torch.float32, channels_last: bool = False
):
    """``plan_id -> the dispatcher's plan dict`` for this input (geometry and hints worked out once)."""
    _module("kernel_plan")
    if dtype not in ACT_DTYPES:
        raise ValueError(f"dtype: expected torch.float32, float16 or bfloat16, got {dtype}")
    x = torch.empty(x_shape, device="meta", dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    geometry, _ = _geometry(x, layer)
    tiled = dtype != torch.float32 and layer.has_tiles
    # Planning reads no memory: the layer's tensors (on any device) and a stand-in for the stream.
    stand_in = torch.empty(1)
    csr = _weights(layer, None)[:8]
    taps = torch.empty(layer.tile_cols.numel(), dtype=tap_code_dtype(layer)) if tiled else None  # their size
    stand_in = _Weights(*csr, *((layer.tile_rows, layer.tile_kptr, taps, stand_in, stand_in) if tiled else (None,) * 5))
    args = _conv_args(
        x,
        x,
        geometry,
        stand_in,
        value_kind=VALUE_KIND_CODES[layer.value_kind],
        bits=layer.bits,
        tc_kind=stream_kind(layer) if tiled else -1,
        relu=False,
        variant=_variant_code(variant),
        max_row=_max_row_hint(layer),
        plan=-1,
    )

    def plan(plan_id: int) -> dict:
        args.plan = plan_id
        return _C.plan(args)

    return plan


def kernel_plan(
    x_shape,
    layer: PackedLayer,
    variant: str = "auto",
    plan: int = -1,
    *,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> dict:
    """The kernel and blocking the dispatcher picks for this input shape, dtype and layout (or candidate
    ``plan``). Needs the compiled module, not a GPU: without one it plans for an H200 (132 SMs, 227 KB of
    shared memory a block)."""
    planner = _planner(x_shape, layer, variant, dtype, channels_last)
    count = _C.plan_candidate_count()
    if not -1 <= plan < count:
        raise ValueError(f"plan: expected -1 (the dispatcher's rule) or a candidate id 0..{count - 1}, got {plan}")
    if plan >= 0 and variant != "auto":
        raise ValueError(f"plan: a candidate plan picks its own kernel; it needs variant 'auto', got {variant!r}")
    return planner(plan)


def distinct_plans(
    x_shape,
    layer: PackedLayer,
    *,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    tensor: Optional[bool] = None,
) -> List[int]:
    """The rule (-1) and the candidate ids that launch differently for this input (many coincide);
    ``tensor``: only those on the tensor cores (True) or on the CUDA cores (False)."""
    planner = _planner(x_shape, layer, "auto", dtype, channels_last)
    first: Dict[tuple, int] = {}
    for plan in range(-1, _C.plan_candidate_count()):
        p = planner(plan)
        if tensor is None or (p["variant"] == "tensor") == tensor:
            first.setdefault(tuple(sorted(p.items())), plan)
    return list(first.values())


# The implicit-GEMM kernels' MMAs by a plan's `wgmma` (cuda/sparsebench.h GemmMma): mma.sync; wgmma for both 2:4
# halves; wgmma for the first half and mma.sync for each warp's own second halves.
GEMM_MMA_NAMES = ("gemm", "wgmma", "wgmma-warp")


def plan_name(plan: Dict[str, Any]) -> str:
    """A short name for a plan dict: the kernel family (CUDA cores or tensor cores) and its blocking."""
    if plan["variant"] == "tensor" and plan.get("pairs") == SPLIT:
        mma = GEMM_MMA_NAMES[plan.get("wgmma", 0)]
        return f"tensor:{mma}{plan['rows_per_block']}x{plan['TW']}/B{plan['blocks']}/split2:4"
    if plan["variant"] == "tensor":
        return (
            f"tensor:MT{plan['MT']}/W{plan['warps_m']}x{plan['warps_k']}x{plan['warps_g']}/"
            f"{plan['NI']}x{plan['TH']}x{plan['TWp']}/CC{plan['CC']}x{plan['chunks']}/B{plan['blocks']}"
            + (f"/2:4x{plan['pairs']}" if plan.get("pairs") else "")
        )
    if plan["variant"] == "stage":
        return (
            f"stage:R{plan['rows_per_block']}/V{plan['V']}/{plan['NI']}x{plan['TH']}x{plan['TW']}/"
            f"CC{plan['CC']}x{plan['chunks']}/B{plan['blocks']}"
        )
    return f"{plan['variant']}:R{plan['rows_per_block']}/W{plan['warps_per_row']}"


# A candidate replaces the rule only when it is more than this much faster: noise must not flip plans.
_AUTOTUNE_MARGIN = 0.03


def autotune_plan(x: torch.Tensor, layer: PackedLayer, *, repeats: int = 10) -> Dict[str, Any]:
    """Time the rule and every distinct candidate plan on ``x`` as the benchmark times a layer (median of
    ``repeats`` runs, L2 flushed before each, the GPU kept ahead of the host) and remember the fastest in
    ``layer.tuned_plans`` for inputs of x's shape, dtype and device. A candidate this GPU cannot launch
    is skipped. Returns ``{"plan": id (-1: the rule), "us": its time, "rule_us": the rule's, "timed": plans timed}``."""
    _check_call(x, layer)
    if _capturing(x.device):
        raise RuntimeError("autotune_plan: cannot time while a CUDA graph is being captured; tune before capture")
    _, shape = _geometry(x, layer)
    out = _empty_out(x, shape)
    times: Dict[int, float] = {}
    with torch.cuda.device(x.device):  # plans count this device's SMs and shared memory
        for plan in distinct_plans(x.shape, layer, dtype=x.dtype, channels_last=is_channels_last(x)):
            run = functools.partial(_launch_into, out, x, layer, False, VARIANTS["auto"], plan)
            try:
                times[plan] = time_cuda([run], warmup=2, repeats=repeats, device=x.device).median_us
            except RuntimeError:
                if plan == -1:
                    raise
    fastest = min(times, key=times.get)
    chosen = fastest if times[fastest] < (1.0 - _AUTOTUNE_MARGIN) * times[-1] else -1
    layer.tuned_plans[_plan_key(x)] = chosen
    return {"plan": chosen, "us": times[chosen], "rule_us": times[-1], "timed": len(times)}


# ---------------------------------------------------------------------------------------
# reference


def reference_conv2d(x: torch.Tensor, layer: PackedLayer, relu: bool = False) -> torch.Tensor:
    """dequantize + F.conv2d in fp32 on x's device; the result in x's dtype."""
    return _reference(
        x, layer, relu, "conv2d", lambda x, w, b: F.conv2d(x, w, b, stride=layer.stride, padding=layer.padding)
    )


def reference_linear(x: torch.Tensor, layer: PackedLayer, relu: bool = False) -> torch.Tensor:
    """dequantize + F.linear in fp32 on x's device; the result in x's dtype."""
    return _reference(x, layer, relu, "linear", F.linear)


def _reference(x: torch.Tensor, layer: PackedLayer, relu: bool, kind: str, op) -> torch.Tensor:
    if layer.kind != kind:
        raise ValueError(f"layer: reference_{kind} needs a {kind} layer, got kind {layer.kind!r}")
    _check_x(x, layer, 4 if kind == "conv2d" else 2)
    w = layer.dequantize().to(x.device)
    b = layer.bias.to(x.device) if layer.bias is not None else None
    y = op(x.float(), w, b)
    return (F.relu(y) if relu else y).to(x.dtype)
