"""The CUDA kernels against torch on the dequantized weights (needs a GPU and sparsebench._C).

Run on a CUDA machine:  pip install -e . && python -m pytest -q -m cuda tests/test_sparse_kernels.py
"""

import random

import pytest
import torch
import torch.nn.functional as F

from sparsebench.sparse.ops import (
    autotune_plan,
    distinct_plans,
    kernel_plan,
    kernels_available,
    set_autotune,
    sparse_conv2d,
    sparse_conv2d_into,
    sparse_linear,
)
from sparsebench.sparse.synthetic import random_layer

# The marks of every GPU kernel test module (this one's, and those that import it).
GPU_TESTS = [
    pytest.mark.cuda,
    pytest.mark.skipif(not kernels_available(), reason="needs a CUDA GPU and the compiled sparsebench._C"),
]
pytestmark = GPU_TESTS

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
VALUES = [
    ("float32", None),
    ("float16", None),
    ("linear", 8),
    ("linear", 4),
    ("linear", 2),
    ("codebook", 8),
    ("codebook", 4),
    ("codebook", 2),
]


def reference(x, layer, relu=False):
    """float64 torch conv/linear on the dequantized weight."""
    w, b = layer.dequantize().double(), layer.bias.double() if layer.bias is not None else None
    if layer.kind == "linear":
        y = F.linear(x.double(), w, b)
    else:
        y = F.conv2d(x.double(), w, b, stride=layer.stride, padding=layer.padding)
    return F.relu(y) if relu else y


def check(out, ref, dtype):
    assert not torch.isnan(out).any(), "unwritten (NaN-poisoned) or NaN outputs"
    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]}"
    # per element too, so a handful of wrong outputs cannot hide in the norm
    worst = ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    assert worst <= 20 * TOL[dtype], f"worst element error {worst:.3g}"


def run_case(seed, variant):
    rnd = random.Random(seed)
    k = rnd.choice([1, 3, 5])
    pad = rnd.choice([0, 1, 2])
    stride = rnd.choice([1, 2])
    cin, cout = rnd.choice([1, 3, 7, 16, 33, 64]), rnd.choice([1, 5, 17, 64, 70])
    hw = rnd.choice([k + 1, 7, 9, 14, 17])
    batch = rnd.choice([1, 2, 3, 5, 8, 33, 64])
    sparsity = rnd.choice([0.0, 0.5, 0.9, 0.95, 0.99])
    value, bits = rnd.choice(VALUES)
    dtype = rnd.choice([torch.float32, torch.float32, torch.float16, torch.bfloat16])
    layer = random_layer(
        (cout, cin, k, k),
        sparsity,
        value=value,
        bits=bits,
        stride=stride,
        padding=pad,
        bias=rnd.random() < 0.8,
        empty_rows=rnd.randint(0, cout // 3),
        seed=seed,
    ).to("cuda")
    x = torch.randn(batch, cin, hw, hw, device="cuda").to(dtype)
    relu = rnd.random() < 0.5
    n, _, h, w = x.shape
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    out = torch.full((n, cout, oh, ow), float("nan"), device="cuda", dtype=dtype)
    sparse_conv2d_into(out, x, layer, relu, variant=variant)
    check(out, reference(x, layer, relu), dtype)


@pytest.mark.parametrize("variant", ["auto", "stage", "rowsplit"])
@pytest.mark.parametrize("seed", range(40))
def test_random_conv_cases(seed, variant):
    run_case(1000 * seed + 7, variant)


@pytest.fixture
def warps_per_row():
    """Force the row-split kernel's warps per output channel; back to automatic afterwards."""
    from sparsebench import _C

    yield lambda w: _C.set_tuning(rowsplit_warps_per_row=w)
    _C.set_tuning()


@pytest.mark.parametrize("wpr", [1, 2, 4])
@pytest.mark.parametrize("seed", range(12))
def test_rowsplit_warps_per_row(seed, wpr, warps_per_row):
    warps_per_row(wpr)
    run_case(1000 * seed + 11, "rowsplit")


@pytest.mark.parametrize("wpr", [0, 1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_rows_of_a_trained_like_layer(wpr, dtype, warps_per_row):
    # Lognormal row lengths (a few rows hold most nonzeros) and some empty rows; 71 rows, not a
    # multiple of the rows a block holds, so with 2 warps per row (2 rows a block) a block with a
    # row past the end meets the barrier too.
    warps_per_row(wpr)
    layer = random_layer((71, 96, 3, 3), 0.9, padding=1, empty_rows=5, row_skew=2.0, seed=5).to("cuda")
    counts = (layer.rowptr[1:] - layer.rowptr[:-1]).cpu()
    assert counts.max() > 4 * counts.float().mean() and (counts == 0).sum() >= 5
    for batch, hw in ((1, 2), (1, 4), (3, 4)):
        x = torch.randn(batch, 96, hw, hw, device="cuda").to(dtype)
        out = torch.full((batch, 71, hw, hw), float("nan"), device="cuda", dtype=dtype)
        sparse_conv2d_into(out, x, layer, relu=True, variant="rowsplit")
        check(out, reference(x, layer, relu=True), dtype)


@pytest.mark.parametrize("value, bits", VALUES)
@pytest.mark.parametrize("variant", ["stage", "rowsplit"])
def test_every_value_kind_on_a_deep_layer(value, bits, variant):
    layer = random_layer((96, 80, 3, 3), 0.9, value=value, bits=bits, padding=1, empty_rows=5, seed=bits or 1).to(
        "cuda"
    )
    x = torch.randn(6, 80, 6, 6, device="cuda")
    out = torch.full((6, 96, 6, 6), float("nan"), device="cuda")
    sparse_conv2d_into(out, x, layer, relu=True, variant=variant)
    check(out, reference(x, layer, relu=True), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["stage", "rowsplit"])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_per_channel_codebook_decodes_each_row_through_its_own_levels(bits, variant, dtype):
    # A [C_out, 2**bits] codebook, each row its own random levels scaled to its channel: a kernel that
    # decoded every row through row 0's codebook (or the wrong row's) would miss the reference by far.
    layer = random_layer(
        (96, 80, 3, 3), 0.9, value="codebook", bits=bits, per_channel=True, padding=1, empty_rows=5, seed=bits
    ).to("cuda")
    assert layer.codebook.shape == (96, 2**bits)
    x = torch.randn(6, 80, 6, 6, device="cuda").to(dtype)
    out = torch.full((6, 96, 6, 6), float("nan"), device="cuda", dtype=dtype)
    sparse_conv2d_into(out, x, layer, relu=True, variant=variant)
    check(out, reference(x, layer, relu=True), dtype)
    fc = random_layer((129, 300), 0.9, value="codebook", bits=bits, per_channel=True, empty_rows=3, seed=bits).to(
        "cuda"
    )
    xf = torch.randn(7, 300, device="cuda").to(dtype)
    check(sparse_linear(xf, fc, relu=True, variant=variant), reference(xf, fc, relu=True), dtype)


@pytest.mark.parametrize("sparsity", [0.0, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("variant", ["stage", "rowsplit"])
def test_sparsity_extremes_and_empty_layer(sparsity, variant):
    layer = random_layer((33, 19, 3, 3), sparsity, padding=1, seed=3).to("cuda")
    x = torch.randn(4, 19, 11, 11, device="cuda")
    out = torch.full((4, 33, 11, 11), float("nan"), device="cuda")
    sparse_conv2d_into(out, x, layer, variant=variant)
    if sparsity == 1.0:  # nothing stored: the output is the bias everywhere
        assert torch.equal(out, layer.bias[None, :, None, None].expand_as(out))
    else:
        check(out, reference(x, layer), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 7, 64, 300])
@pytest.mark.parametrize("value, bits", [("float32", None), ("linear", 4), ("codebook", 2)])
def test_linear(dtype, batch, value, bits):
    layer = random_layer((129, 300), 0.9, value=value, bits=bits, empty_rows=3, seed=batch).to("cuda")
    x = torch.randn(batch, 300, device="cuda").to(dtype)
    out = torch.full((batch, 129), float("nan"), device="cuda", dtype=dtype)
    sparse_conv2d_into(out, x, layer, relu=True)
    check(out, reference(x, layer, relu=True), dtype)
    check(sparse_linear(x, layer, relu=True), reference(x, layer, relu=True), dtype)


def test_wide_layer_with_int32_indices():
    layer = random_layer((40, 70000), 0.999, seed=11).to("cuda")
    assert layer.colidx.dtype == torch.int32
    x = torch.randn(3, 70000, device="cuda")
    check(sparse_linear(x, layer), reference(x, layer), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rowsplit_1x1_vector_loads(dtype):
    # One image of 14x14, three of 4x4 (tiles inside an image: 4-wide vector loads), two of 14x14 (tiles
    # cross images: scalar loads), and an input one element off 16-byte alignment (scalar loads).
    layer = random_layer((37, 64, 1, 1), 0.8, value="linear", bits=4, empty_rows=2, seed=17).to("cuda")
    for n, hw, offset in ((1, 14, 0), (3, 4, 0), (2, 14, 0), (1, 14, 1)):
        numel = n * 64 * hw * hw
        x = torch.randn(numel + offset, device="cuda").to(dtype)[offset:].view(n, 64, hw, hw)
        out = torch.full((n, 37, hw, hw), float("nan"), device="cuda", dtype=dtype)
        sparse_conv2d_into(out, x, layer, relu=True, variant="rowsplit")
        check(out, reference(x, layer, relu=True), dtype)


PLAN_SHAPES = [  # (weight shape, stride, padding, input shape): 3x3, stride-2, 1x1 (flattened), odd sizes, a linear
    ((70, 33, 3, 3), 1, 1, (5, 33, 14, 14)),
    ((64, 48, 3, 3), 2, 1, (8, 48, 17, 17)),
    ((96, 80, 1, 1), 1, 0, (3, 80, 9, 9)),
    ((17, 7, 5, 5), 1, 2, (2, 7, 11, 11)),
    ((40, 300), 1, 0, (33, 300)),
]


@pytest.mark.parametrize("case", range(len(PLAN_SHAPES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("value", ["linear", "codebook_per_channel"])
def test_every_candidate_plan(case, dtype, value):
    wshape, stride, pad, xshape = PLAN_SHAPES[case]
    kind = {"value": "linear"} if value == "linear" else {"value": "codebook", "per_channel": True}
    layer = random_layer(wshape, 0.9, bits=4, stride=stride, padding=pad, empty_rows=3, seed=case, **kind).to("cuda")
    x = torch.randn(xshape, device="cuda").to(dtype)
    ref = reference(x, layer, relu=True)
    plans = distinct_plans(xshape, layer, dtype=dtype)
    assert len(plans) >= 4
    for plan in plans:
        layer.tuned_plans = {(tuple(xshape), dtype, x.device.index, False): plan}  # what autotuning would leave
        out = torch.full(ref.shape, float("nan"), device="cuda", dtype=dtype)
        sparse_conv2d_into(out, x, layer, relu=True)
        check(out, ref, dtype)


def test_several_input_chunks():
    # A small shared-memory budget splits C_in into chunks: partial sums wait in shared memory, the row
    # cursors carry over between chunks, and linear lanes (5x5, stride 1) read past each chunk's input.
    from sparsebench import _C

    for wshape, pad, xshape, sparsity, budget in (
        ((17, 40, 5, 5), 2, (1, 40, 11, 11), 0.9, 16384),
        ((96, 256, 3, 3), 1, (2, 256, 14, 14), 0.5, 32768),
        ((96, 256, 3, 3), 1, (2, 256, 14, 14), 0.0, 32768),
    ):
        _C.set_tuning(smem_budget=budget, stage_v=4)
        layer = random_layer(wshape, sparsity, value="linear", bits=8, padding=pad, empty_rows=2, seed=18).to("cuda")
        p = kernel_plan(xshape, layer, variant="stage")
        assert p["chunks"] > 2, p
        x = torch.randn(xshape, device="cuda")
        out = torch.full((xshape[0], wshape[0], xshape[2], xshape[3]), float("nan"), device="cuda")
        sparse_conv2d_into(out, x, layer, relu=True, variant="stage")
        check(out, reference(x, layer, relu=True), torch.float32)


def test_autotune_keeps_the_fastest_plan_per_input_shape():
    set_autotune(True)
    layer = random_layer((128, 64, 3, 3), 0.9, padding=1, seed=16).to("cuda")
    x = torch.randn(16, 64, 14, 14, device="cuda")
    check(sparse_conv2d(x, layer), reference(x, layer), torch.float32)  # the first call tunes
    key = ((16, 64, 14, 14), torch.float32, x.device.index, False)
    assert list(layer.tuned_plans) == [key]
    result = autotune_plan(x, layer)
    assert result["timed"] == len(distinct_plans(x.shape, layer)) >= 4
    assert result["plan"] == -1 or result["us"] < 0.97 * result["rule_us"]  # a candidate must clearly win
    assert layer.tuned_plans[key] == result["plan"]
    # Under capture an input shape never seen runs the rule, without timing; a tuned one its plan.
    small = torch.randn(2, 64, 14, 14, device="cuda")
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y_small = sparse_conv2d(small, layer)
        y = sparse_conv2d(x, layer)
    g.replay()
    torch.cuda.synchronize()
    assert list(layer.tuned_plans) == [key]
    check(y, reference(x, layer), torch.float32)
    check(y_small, reference(small, layer), torch.float32)
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        with pytest.raises(RuntimeError, match="cannot time while a CUDA graph is being captured"):
            autotune_plan(x, layer)


def test_runs_on_the_current_stream():
    layer = random_layer((16, 8, 3, 3), 0.8, padding=1, seed=12).to("cuda")
    x = torch.randn(2, 8, 10, 10, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y = sparse_conv2d(x, layer)
    s.synchronize()
    check(y, reference(x, layer), torch.float32)


def test_cuda_graph_capture_and_replay():
    layer = random_layer((64, 32, 3, 3), 0.9, value="linear", bits=4, padding=1, seed=13).to("cuda")
    x = torch.randn(8, 32, 16, 16, device="cuda")
    sparse_conv2d(x, layer, relu=True)  # warm-up outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = sparse_conv2d(x, layer, relu=True)
    x.copy_(torch.randn_like(x))  # new data, same buffer
    g.replay()
    torch.cuda.synchronize()
    check(y, reference(x, layer, relu=True), torch.float32)


def test_torch_compile():
    layer = random_layer((32, 16, 3, 3), 0.9, padding=1, seed=14).to("cuda")

    def block(x):
        return sparse_conv2d(x * 2.0, layer, relu=True) + 1.0

    compiled = torch.compile(block)
    x = torch.randn(4, 16, 12, 12, device="cuda")
    check(compiled(x), reference(x * 2.0, layer, relu=True) + 1.0, torch.float32)


def test_validation_on_the_gpu():
    layer = random_layer((8, 4, 3, 3), 0.5, seed=15).to("cuda")
    with pytest.raises(ValueError, match="x: must be contiguous"):
        sparse_conv2d(torch.randn(1, 4, 16, 8, device="cuda")[:, :, ::2], layer)
    with pytest.raises(ValueError, match=r"layer\.values: on cpu"):
        cpu_values = layer.to("cuda")
        cpu_values.values = cpu_values.values.cpu()
        sparse_conv2d(torch.randn(1, 4, 8, 8, device="cuda"), cpu_values)
    with pytest.raises(ValueError, match="out: expected a contiguous"):
        sparse_conv2d_into(torch.empty(1, 8, 5, 5, device="cuda"), torch.randn(1, 4, 8, 8, device="cuda"), layer)


@pytest.mark.parametrize("variant", ["auto", "stage", "rowsplit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernels_as_wide_as_the_lanes(variant, dtype):
    # 1-D convolutions written as 2-D: a 1x33 or 1x41 kernel once broke the staged kernel's planner
    # (a zero-width tile: SIGFPE on the GPU, an endless loop on the CPU).
    for kw, width in ((33, 56), (41, 64), (129, 130)):
        layer = random_layer((16, 8, 1, kw), 0.5, padding=0, seed=kw).to("cuda")
        x = torch.randn(32, 8, 1, width, device="cuda").to(dtype)
        out = torch.full((32, 16, 1, width - kw + 1), float("nan"), device="cuda", dtype=dtype)
        sparse_conv2d_into(out, x, layer, relu=True, variant=variant)
        check(out, reference(x, layer, relu=True), dtype)
