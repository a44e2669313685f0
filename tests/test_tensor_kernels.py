"""The tensor-core kernels (fp16/bf16 activations) against float64 torch on the dequantized weights.

Needs a GPU and sparsebench._C:  python -m pytest -q -m cuda tests/test_tensor_kernels.py
Tolerances (relative to the reference's norm; the worst element within 20x): 1e-2 for fp16 and
2e-2 for bf16 activations. The weights enter the MMAs rounded to the activation dtype (codes exactly:
a linear code minus its zero point is a small integer), the sums are fp32.
"""

import random

import pytest
import torch

from sparsebench.sparse.ops import (
    distinct_plans,
    is_channels_last,
    kernel_plan,
    sparse_conv2d,
    sparse_conv2d_into,
    sparse_linear,
)
from sparsebench.sparse.synthetic import random_layer
from tests.test_sparse_kernels import GPU_TESTS, VALUES, check, reference

pytestmark = GPU_TESTS

HALF = [torch.float16, torch.bfloat16]


@pytest.fixture(params=[0, 1, 2, 4], ids=["dense-mma", "pairs", "pairs-x2", "pairs-x4"])
def pairs(request):
    """The rule's tensor-core MMAs: dense on the dense-MMA stream (0) or sparse on the 2:4 stream of 1, 2 or 4
    groups a k-step."""
    from sparsebench import _C

    _C.set_tuning(tc_pairs=request.param)
    yield request.param
    _C.set_tuning()


def poisoned(shape, dtype, channels_last=False):
    out = torch.full(shape, float("nan"), device="cuda", dtype=dtype)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def tensor_case(seed, in_channels=(1, 3, 7, 16, 33, 64, 130), out_channels=(1, 5, 17, 32, 70), channels_last=None):
    """A random conv: odd channel counts, 1x1..7x7 kernels, non-square inputs, strides, paddings, any value kind;
    in either layout unless ``channels_last`` says which."""
    rnd = random.Random(seed)
    kh, kw = rnd.choice([(1, 1), (3, 3), (5, 5), (7, 7), (1, 3), (3, 1)])
    pad = rnd.choice([0, 1, 2, 3])
    stride = rnd.choice([1, 1, 2, 3])
    cin, cout = rnd.choice(in_channels), rnd.choice(out_channels)
    h, w = rnd.randint(kh, 19), rnd.randint(kw, 23)
    batch = rnd.choice([1, 2, 3, 5, 8, 17])
    sparsity = rnd.choice([0.0, 0.5, 0.9, 0.95, 0.99])
    value, bits = rnd.choice(VALUES)
    kind = {"per_channel": rnd.random() < 0.5} if value == "codebook" else {}
    layer = random_layer(
        (cout, cin, kh, kw),
        sparsity,
        value=value,
        bits=bits,
        stride=stride,
        padding=pad,
        bias=rnd.random() < 0.8,
        empty_rows=rnd.randint(0, cout // 3),
        seed=seed,
        **kind,
    ).to("cuda")
    x = torch.randn(batch, cin, h, w, device="cuda").to(rnd.choice(HALF))
    if (rnd.random() < 0.5) if channels_last is None else channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return layer, x, rnd.random() < 0.5


@pytest.mark.parametrize("seed", range(60))
def test_random_conv_cases(seed, pairs):
    layer, x, relu = tensor_case(31 * seed + 5)
    plan = kernel_plan(x.shape, layer, variant="tensor", dtype=x.dtype, channels_last=is_channels_last(x))
    assert plan["variant"] == "tensor" and plan["pairs"] == pairs
    y = sparse_conv2d(x, layer, relu, variant="tensor")
    assert y.is_contiguous(memory_format=torch.channels_last) if is_channels_last(x) else y.is_contiguous()
    check(y, reference(x, layer, relu), x.dtype)


@pytest.mark.parametrize("value, bits", VALUES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_every_value_kind(value, bits, channels_last, pairs):
    layer = random_layer((70, 48, 3, 3), 0.9, value=value, bits=bits, padding=1, empty_rows=5, seed=bits or 2).to(
        "cuda"
    )
    for dtype in HALF:
        x = torch.randn(6, 48, 9, 13, device="cuda").to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = poisoned((6, 70, 9, 13), dtype, channels_last)
        sparse_conv2d_into(out, x, layer, relu=True, variant="tensor")
        check(out, reference(x, layer, relu=True), dtype)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("per_channel", [False, True])
def test_codebooks_without_a_zero_level(bits, per_channel, pairs):
    # A dense layer whose codebook has no zero level: the tiles' padding needs a code of zero. With a
    # free code the stream's codebook gains a zero level; a full codebook makes the stream hold values.
    from sparsebench.sparse.format import pack_weight
    from sparsebench.sparse.pairs import pair_stream
    from sparsebench.sparse.tiles import TC_CODEBOOK, TC_HALF, fragment_stream

    gen = torch.Generator().manual_seed(bits)
    for levels, kind in ((2**bits - 1, TC_CODEBOOK), (2**bits, TC_HALF)):
        book = torch.rand((20, levels) if per_channel else (levels,), generator=gen) + 0.5
        codes = torch.randint(0, levels, (20, 24, 3, 3), generator=gen)
        weight = (book.gather(1, codes.view(20, -1)) if per_channel else book[codes]).view(codes.shape)
        layer = pack_weight(
            weight, torch.randn(20, generator=gen), padding=1, bits=bits, codes=codes, codebook=book
        ).to("cuda")
        x = torch.randn(3, 24, 10, 10, device="cuda", dtype=torch.float16)
        assert fragment_stream(layer, x.dtype).kind == pair_stream(layer, x.dtype, max(pairs, 1)).kind == kind
        check(sparse_conv2d(x, layer, variant="tensor"), reference(x, layer), torch.float16)


PLAN_SHAPES = [  # (weight shape, stride, padding, input shape)
    ((70, 33, 3, 3), 1, 1, (5, 33, 14, 14)),
    ((64, 48, 3, 3), 2, 1, (8, 48, 17, 17)),
    ((96, 80, 1, 1), 1, 0, (3, 80, 9, 9)),
    ((17, 7, 5, 5), 1, 2, (2, 7, 11, 11)),
    ((128, 256, 3, 3), 1, 1, (9, 256, 4, 4)),
    ((40, 300), 1, 0, (33, 300)),
]


@pytest.mark.parametrize("case", range(len(PLAN_SHAPES)))
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("value", ["float16", "linear", "codebook_per_channel"])
def test_every_tensor_plan(case, dtype, value):
    wshape, stride, pad, xshape = PLAN_SHAPES[case]
    kind = {"value": "codebook", "per_channel": True} if value == "codebook_per_channel" else {"value": value}
    layer = random_layer(
        wshape, 0.9, bits=None if value == "float16" else 4, stride=stride, padding=pad, empty_rows=3, seed=case, **kind
    ).to("cuda")
    x = torch.randn(xshape, device="cuda").to(dtype)
    ref = reference(x, layer, relu=True)
    plans = distinct_plans(xshape, layer, dtype=dtype, tensor=True)
    assert len(plans) >= 3
    for plan in plans:
        layer.tuned_plans = {(tuple(xshape), dtype, x.device.index, False): plan}
        out = poisoned(ref.shape, dtype)
        sparse_conv2d_into(out, x, layer, relu=True)
        check(out, ref, dtype)


def test_many_chunks_and_straddling_k_steps(pairs):
    # A small staging budget (the warps' rings of k-steps take ~13-51 KB of it, the most with 2:4 k-steps of
    # four groups): few channels a chunk, so k-steps of 16 or 32 taps span two or three chunks.
    from sparsebench import _C

    try:
        for wshape, xshape, sparsity in (
            ((33, 40, 5, 5), (3, 40, 11, 11), 0.9),
            ((64, 96, 3, 3), (2, 96, 14, 14), 0.5),
            ((20, 64, 1, 1), (4, 64, 8, 8), 0.0),
        ):
            _C.set_tuning(tc_smem_budget={0: 24, 1: 32, 2: 32, 4: 56}[pairs] * 1024, tc_pairs=pairs)
            pad = wshape[2] // 2
            layer = random_layer(wshape, sparsity, value="linear", bits=8, padding=pad, empty_rows=2, seed=18).to(
                "cuda"
            )
            x = torch.randn(xshape, device="cuda", dtype=torch.float16)
            p = kernel_plan(xshape, layer, variant="tensor", dtype=x.dtype)
            assert p["chunks"] > 2, p
            out = poisoned((xshape[0], wshape[0], xshape[2], xshape[3]), x.dtype)
            sparse_conv2d_into(out, x, layer, relu=True, variant="tensor")
            check(out, reference(x, layer, relu=True), x.dtype)
    finally:
        _C.set_tuning()


@pytest.mark.parametrize("width", [1, 2, 3, 5, 7, 12, 14])
@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_narrow_images_side_by_side(width, k):
    # Same padding keeps OW == W, so the staging reads one window that runs across the images of a
    # band; each element must keep only its own image's columns (a width below 8 puts 2-8 images in
    # one group of 8 columns). Every tensor plan, in both layouts.
    layer = random_layer((40, 19, k, k), 0.8, padding=k // 2, empty_rows=2, seed=width * 8 + k).to("cuda")
    for channels_last in (False, True):
        x = torch.randn(11, 19, 6, width, device="cuda", dtype=torch.float16)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ref = reference(x, layer, relu=False)
        side_by_side = 0
        for plan in distinct_plans(x.shape, layer, dtype=x.dtype, channels_last=channels_last, tensor=True):
            p = kernel_plan(x.shape, layer, plan=plan, dtype=x.dtype, channels_last=channels_last)
            side_by_side += p["P"] > 1
            layer.tuned_plans = {(tuple(x.shape), x.dtype, x.device.index, channels_last): plan}
            out = poisoned(ref.shape, x.dtype, channels_last)
            sparse_conv2d_into(out, x, layer)
            check(out, ref, x.dtype)
        assert side_by_side or width % 8 == 0 or width >= 32


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("batch", [1, 7, 64, 300])
def test_linear(dtype, batch, pairs):
    check_linear(dtype, batch, in_features=300)


def check_linear(dtype, batch, in_features):
    """A 90%-sparse 4-bit linear layer with empty rows on the tensor cores, with ReLU, against torch."""
    layer = random_layer((129, in_features), 0.9, value="linear", bits=4, empty_rows=3, seed=batch).to("cuda")
    x = torch.randn(batch, in_features, device="cuda").to(dtype)
    check(sparse_linear(x, layer, relu=True, variant="tensor"), reference(x, layer, relu=True), dtype)


@pytest.mark.parametrize("sparsity", [0.0, 0.99, 1.0])
def test_sparsity_extremes(sparsity):
    layer = random_layer((33, 19, 3, 3), sparsity, padding=1, seed=3).to("cuda")
    x = torch.randn(4, 19, 11, 11, device="cuda", dtype=torch.float16)
    out = poisoned((4, 33, 11, 11), x.dtype)
    sparse_conv2d_into(out, x, layer, variant="tensor")
    if sparsity == 1.0:  # no taps at all: the output is the bias everywhere
        assert torch.equal(out, layer.bias.half()[None, :, None, None].expand_as(out))
    else:
        check(out, reference(x, layer), x.dtype)


def test_cuda_graph_capture_and_replay():
    layer = random_layer((64, 32, 3, 3), 0.9, value="linear", bits=4, padding=1, seed=13).to("cuda")
    x = torch.randn(8, 32, 16, 16, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    sparse_conv2d(x, layer, relu=True)  # warm-up outside the capture builds the weight stream
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = sparse_conv2d(x, layer, relu=True)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert kernel_plan(x.shape, layer, dtype=x.dtype, channels_last=True)["variant"] == "tensor"
    check(y, reference(x, layer, relu=True), x.dtype)
