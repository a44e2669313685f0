"""The backend registry: each backend turns one layer case into a callable on an input.

``BACKENDS[name].prepare(case, device, activations)`` -> ``Prepared``: ``run(x)`` computes the
layer on an input already in the backend's layout (``convert`` makes that from an fp32 NCHW
tensor, once, outside the timed region), ``weight`` is the dense fp32 weight whose result it
must reproduce (the correctness check compares against it), ``tol`` the allowed error
relative to the largest reference output.

A backend may not run here (no GPU, no compiled kernels, an old torch): ``unavailable(device)``
says why, and the benchmark logs that and skips it. A shape a backend does not support
(e.g. 2:4 on tiny matrices) raises ``Unsupported`` from ``prepare``: that layer is skipped on it.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from sparsebench.bench.cases import LayerCase
from sparsebench.sparse.ops import (
    is_channels_last,
    kernel_plan,
    kernels_unavailable_reason,
    plan_name,
    reference_conv2d,
    reference_linear,
    sparse_conv2d,
    sparse_linear,
)

ACT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Allowed max |y - ref| / max |ref| per compute precision.
TOLERANCE = {"fp32": 1e-4, "tf32": 1e-2, "fp16": 1e-2, "bf16": 4e-2}


class Unsupported(Exception):
    """This backend cannot run this particular layer (shape, dtype); the message says why."""


@dataclass
class Prepared:
    run: Callable[[torch.Tensor], torch.Tensor]
    convert: Callable[[torch.Tensor], torch.Tensor]
    weight: torch.Tensor  # dense fp32 (CPU) weight this backend's result must match
    tol: float
    weight_bytes: int  # bytes of weights (and indices, scales) the backend reads
    act_bytes: int  # bytes per activation element
    sparse: bool  # computes only the nonzeros
    context: Callable[[], ContextManager] = contextlib.nullcontext
    dtype: torch.dtype = torch.float32  # activations, for the rest of a network around this layer
    channels_last: bool = False
    columns: Callable[[], Dict[str, object]] = dict  # extra result columns, read after the timed runs
    # The same backend in the other activation layout, where either may be the faster (fp16/bf16 convs
    # of ours: in NCHW the CUDA-core kernels compete too). The benchmark times both and keeps the faster.
    other_layout: Optional[Callable[[], "Prepared"]] = None

    @property
    def layout(self) -> str:
        return "nhwc" if self.channels_last else "nchw"


# The other layout counts only when faster by this much: the first (cuDNN's) wins near-ties, so picking
# the smaller of two noisy medians does not flatter ours.
LAYOUT_MARGIN = 0.03


def faster_layout(first_us: float, other_us: float) -> bool:
    """Whether the other layout's time beats the first one's by ``LAYOUT_MARGIN``."""
    return other_us < (1.0 - LAYOUT_MARGIN) * first_us


@dataclass(frozen=True)
class Backend:
    name: str
    devices: Tuple[str, ...]
    sparse: bool
    prepare: Callable[[LayerCase, torch.device, str], Prepared]
    unavailable_fn: Callable[[torch.device], Optional[str]] = field(default=lambda device: None)
    describe: str = ""

    def unavailable(self, device: torch.device) -> Optional[str]:
        reason = self.unavailable_fn(device)
        if reason is None and device.type not in self.devices:
            reason = f"runs on {' or '.join(self.devices)}, the benchmark runs on {device.type}"
        return reason


BACKENDS: Dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    BACKENDS[backend.name] = backend
    return backend


# ------------------------------------------------------------------ helpers


def _no_cuda(device: torch.device) -> Optional[str]:
    return None if torch.cuda.is_available() else "torch sees no CUDA GPU"


@contextlib.contextmanager
def cudnn_precision(tf32: bool, benchmark: bool = True):
    """TF32 on or off for convolutions and matmuls, cuDNN autotuning as ``benchmark`` says (legacy flags,
    restored after)."""
    old_mm = torch.backends.cuda.matmul.allow_tf32
    with torch.backends.cudnn.flags(enabled=True, benchmark=benchmark, deterministic=False, allow_tf32=tf32):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old_mm


def _dense_forward(case: LayerCase, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    if case.kind == "conv2d":
        return lambda x: F.conv2d(x, weight, bias, stride=case.stride, padding=case.padding)
    return lambda x: F.linear(x, weight, bias)


def _bias(case: LayerCase, device: torch.device, dtype: torch.dtype) -> Optional[torch.Tensor]:
    return case.bias.to(device, dtype) if case.bias is not None else None


def _to(device: torch.device, dtype: torch.dtype, channels_last: bool = False):
    def convert(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, dtype)
        if channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()

    return convert


# ------------------------------------------------------------------ dense baselines


def _cudnn(dtype_name: str, tf32: bool, channels_last: bool):
    def prepare(case: LayerCase, device: torch.device, activations: str) -> Prepared:
        dtype = ACT_DTYPES[dtype_name]
        w = case.weight.to(device, dtype)
        if channels_last and w.dim() == 4:
            w = w.contiguous(memory_format=torch.channels_last)
        precision = "tf32" if tf32 else dtype_name
        return Prepared(
            run=_dense_forward(case, w, _bias(case, device, dtype)),
            convert=_to(device, dtype, channels_last),
            weight=case.weight,
            tol=TOLERANCE[precision],
            weight_bytes=w.numel() * w.element_size(),
            act_bytes=w.element_size(),
            sparse=False,
            context=lambda: cudnn_precision(tf32),
            dtype=dtype,
            channels_last=channels_last,
        )

    return prepare


register(
    Backend(
        "cudnn_fp32",
        ("cuda",),
        False,
        _cudnn("fp32", tf32=False, channels_last=False),
        _no_cuda,
        "cuDNN, fp32, TF32 off, NCHW",
    )
)
register(
    Backend(
        "cudnn_tf32",
        ("cuda",),
        False,
        _cudnn("fp32", tf32=True, channels_last=False),
        _no_cuda,
        "cuDNN, fp32 tensors with TF32 math, NCHW",
    )
)
register(
    Backend(
        "cudnn_fp16",
        ("cuda",),
        False,
        _cudnn("fp16", tf32=False, channels_last=True),
        _no_cuda,
        "cuDNN, fp16, channels_last (NHWC)",
    )
)
register(
    Backend(
        "cudnn_bf16",
        ("cuda",),
        False,
        _cudnn("bf16", tf32=False, channels_last=True),
        _no_cuda,
        "cuDNN, bf16, channels_last (NHWC)",
    )
)


def _torch_cpu(case: LayerCase, device: torch.device, activations: str) -> Prepared:
    w = case.weight.clone()
    return Prepared(
        run=_dense_forward(case, w, case.bias),
        convert=_to(device, torch.float32),
        weight=case.weight,
        tol=TOLERANCE["fp32"],
        weight_bytes=4 * w.numel(),
        act_bytes=4,
        sparse=False,
    )


register(Backend("torch_cpu", ("cpu",), False, _torch_cpu, describe="dense fp32 on the CPU (torch's own conv)"))


# ------------------------------------------------------------------ sparse backends


def _direct_unavailable(device: torch.device) -> Optional[str]:
    return kernels_unavailable_reason()


def _direct_sparse(
    case: LayerCase, device: torch.device, activations: str, channels_last: Optional[bool] = None
) -> Prepared:
    dtype = ACT_DTYPES[activations]
    layer = case.packed.to(device)
    op = sparse_conv2d if case.kind == "conv2d" else sparse_linear
    # fp16/bf16 convs run channels_last first, as cuDNN does (only the tensor-core kernels read it), and
    # NCHW as the other layout (the CUDA-core kernels too): the faster counts. fp32 and linear layers
    # run NCHW. Inside a network a view may arrive (e.g. after flatten).
    either = dtype != torch.float32 and case.kind == "conv2d"
    other = None
    if channels_last is None:
        channels_last = either
        if either:
            other = lambda: _direct_sparse(case, device, activations, channels_last=False)  # noqa: E731

    def run(x: torch.Tensor) -> torch.Tensor:
        return op(x if x.is_contiguous() or is_channels_last(x) else x.contiguous(), layer)

    weight_bytes = layer.footprint_bytes() + (layer.tile_bytes() if dtype != torch.float32 else 0)
    return Prepared(
        run=run,
        convert=_to(device, dtype, channels_last),
        weight=case.weight,
        tol=TOLERANCE[activations],
        weight_bytes=weight_bytes,
        act_bytes=torch.empty((), dtype=dtype).element_size(),
        sparse=True,
        dtype=dtype,
        channels_last=channels_last,
        columns=lambda: _tuned_plan(layer),
        other_layout=other,
    )


def _tuned_plan(layer) -> Dict[str, object]:
    """The plan the autotuner chose for the one input this layer ran on (-1: the rule) and its kernel."""
    plans = set(layer.tuned_plans.items())
    if len(plans) != 1:
        return {"kernel_plan": -1, "kernel": None}
    (shape, dtype, _, channels_last), plan = plans.pop()
    name = plan_name(kernel_plan(shape, layer, plan=plan, dtype=dtype, channels_last=channels_last))
    return {"kernel_plan": plan, "kernel": name}


register(
    Backend(
        "direct_sparse",
        ("cuda",),
        True,
        _direct_sparse,
        _direct_unavailable,
        "ours: direct sparse convolution over the packed format (sparsebench._C)",
    )
)


def _sparse_reference(case: LayerCase, device: torch.device, activations: str) -> Prepared:
    layer = case.packed.to(device)
    op = reference_conv2d if case.kind == "conv2d" else reference_linear
    return Prepared(
        run=lambda x: op(x, layer),
        convert=_to(device, torch.float32),
        weight=case.weight,
        tol=TOLERANCE["fp32"],
        weight_bytes=layer.footprint_bytes(),
        act_bytes=4,
        sparse=True,
    )


register(
    Backend(
        "sparse_reference",
        ("cpu",),
        True,
        _sparse_reference,
        describe="the reference sparse forward (decode the packed layer + dense conv), CPU",
    )
)


def _csr_matrix(case: LayerCase, device: torch.device) -> torch.Tensor:
    dense = case.weight.reshape(case.out_channels, -1)
    with warnings.catch_warnings():  # "CSR support is in beta": known, and said once per layer otherwise
        warnings.simplefilter("ignore", UserWarning)
        csr = dense.to_sparse_csr()
        return torch.sparse_csr_tensor(
            csr.crow_indices().to(torch.int32),
            csr.col_indices().to(torch.int32),
            csr.values(),
            size=dense.shape,
            check_invariants=False,
        ).to(device)


def _im2col(case: LayerCase) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [N, C, H, W] -> the conv's input columns [N, C*KH*KW, OH*OW] (the GEMM baselines' im2col)."""
    kernel = case.packed.kernel_size
    return lambda x: F.unfold(x, kernel, padding=case.padding, stride=case.stride)


def _torch_csr(case: LayerCase, device: torch.device, activations: str) -> Prepared:
    w = _csr_matrix(case, device)
    bias = _bias(case, device, torch.float32)
    co = case.out_channels
    if case.kind == "conv2d":
        im2col = _im2col(case)
        _, oh, ow = case.out_shape()

        def run(x: torch.Tensor) -> torch.Tensor:
            n = x.shape[0]
            cols = im2col(x)
            cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # [K, N*L]
            y = (w @ cols).reshape(co, n, oh, ow).transpose(0, 1)
            return y + bias.view(1, -1, 1, 1) if bias is not None else y
    else:

        def run(x: torch.Tensor) -> torch.Tensor:
            y = (w @ x.t()).t()
            return y + bias if bias is not None else y

    nnz = w.values().numel()
    return Prepared(
        run=run,
        convert=_to(device, torch.float32),
        weight=case.weight,
        tol=TOLERANCE["fp32"],
        weight_bytes=8 * nnz + 4 * (co + 1),
        act_bytes=4,
        sparse=True,
    )


register(
    Backend(
        "torch_csr",
        ("cuda", "cpu"),
        True,
        _torch_csr,
        describe="torch.sparse CSR (cuSPARSE SpMM on CUDA) times im2col (unfold) of the input, fp32",
    )
)


# ------------------------------------------------------------------ 2:4 semi-structured (structured reference)


def _semi_unavailable(device: torch.device) -> Optional[str]:
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "2:4 sparse tensor cores need compute capability 8.0 or newer"
    return None


def prune_2to4(matrix: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest-magnitude of every 4 consecutive weights along each row."""
    rows, cols = matrix.shape
    groups = matrix.reshape(rows, cols // 4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(rows, cols)


def _semi_structured(case: LayerCase, device: torch.device, activations: str) -> Prepared:
    from torch.sparse import to_sparse_semi_structured  # late: loads torch's sparse-GEMM machinery

    co = case.out_channels
    k = case.packed.row_length
    if k % 64 or co % 32:
        raise Unsupported(
            f"2:4 (fp16) needs in_features*kernel a multiple of 64 and out_channels a multiple of 32, got {k} and {co}"
        )
    pruned = prune_2to4(case.weight.reshape(co, k))  # its own 2:4 mask: a structured-sparsity reference
    try:
        w = to_sparse_semi_structured(pruned.to(device, torch.float16))
    except (RuntimeError, ValueError) as e:
        raise Unsupported(f"to_sparse_semi_structured refused the weight: {str(e).splitlines()[0]}") from None
    bias = _bias(case, device, torch.float16)
    wbytes = (
        sum(
            t.numel() * t.element_size()
            for t in (getattr(w, "packed", None), getattr(w, "meta", None))
            if isinstance(t, torch.Tensor)
        )
        or co * k
    )
    if case.kind == "conv2d":
        im2col = _im2col(case)
        _, oh, ow = case.out_shape()

        def run(x: torch.Tensor) -> torch.Tensor:
            n = x.shape[0]
            rows = im2col(x).transpose(1, 2).reshape(-1, k)  # [N*L, K]
            y = F.linear(rows, w, bias)  # [N*L, C_out]
            return y.reshape(n, oh, ow, co).permute(0, 3, 1, 2)
    else:

        def run(x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, w, bias)

    prepared = Prepared(
        run=run,
        convert=_to(device, torch.float16),
        weight=pruned.reshape(case.weight.shape),
        tol=TOLERANCE["fp16"],
        weight_bytes=wbytes,
        act_bytes=2,
        sparse=True,
        dtype=torch.float16,
    )
    try:  # some shapes pass the checks above and still fail inside the sparse matmul
        with torch.no_grad():
            prepared.run(prepared.convert(torch.zeros((1, *case.in_shape))))
    except (RuntimeError, ValueError, NotImplementedError) as e:
        raise Unsupported(f"2:4 matmul failed on this shape: {str(e).splitlines()[0]}") from None
    return prepared


register(
    Backend(
        "semi_structured_2to4",
        ("cuda",),
        True,
        _semi_structured,
        _semi_unavailable,
        "torch 2:4 semi-structured sparsity (fp16, its own 2:4 mask) over im2col: structured reference",
    )
)


def mask_dependent(name: str) -> bool:
    """Whether the backend's time depends on the layer's mask (2:4 brings its own fixed-density mask)."""
    return BACKENDS[name].sparse and name != "semi_structured_2to4"
