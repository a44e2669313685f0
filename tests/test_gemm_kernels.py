"""The implicit-GEMM tensor-core kernel (cuda/conv_gemm.cu) on the split stream, against torch on the dequantized
weights; tolerances as tests/test_tensor_kernels.py (1e-2 fp16, 2e-2 bf16, relative to the reference's norm).

Needs a GPU and sparsebench._C:  python -m pytest -q -m cuda tests/test_gemm_kernels.py
"""

import pytest
import torch

from sparsebench.sparse.ops import (
    GEMM_MMA_NAMES,
    distinct_plans,
    kernel_plan,
    sparse_conv2d,
    sparse_conv2d_into,
)
from sparsebench.sparse.split import SPLIT
from sparsebench.sparse.synthetic import random_layer
from tests.test_sparse_kernels import GPU_TESTS, check, reference
from tests.test_tensor_kernels import HALF, check_linear, poisoned, tensor_case

pytestmark = GPU_TESTS

# The block tiles (cuda/sparsebench.h kGemmTiles): output channels x pixels a block, pixels a warp, and the MMAs
# (GemmMma: mma.sync; Hopper's wgmma for both 2:4 halves; wgmma and each warp's second halves by mma.sync).
TILES = [(128, 128, 32), (128, 64, 32), (64, 128, 32), (64, 64, 32), (128, 128, 64), (64, 128, 64), (128, 256, 64)]
TILES = [(*t, 0) for t in TILES] + [
    (*t, m) for m in (1, 2) for t in [(64, 128, 128), (128, 128, 128), (64, 256, 256), (128, 256, 256)]
]
WGMMA_TILES = range(7, len(TILES))


def wgmma_available() -> bool:
    """A compute capability 9.0 GPU and a build with the wgmma kernel (archs including 90)."""
    from sparsebench import _C

    built = any(k.startswith("conv_wgmma") for k in _C.build_info()["kernels"])
    return built and torch.cuda.get_device_capability() == (9, 0)


def _tile_id(i: int) -> str:
    return GEMM_MMA_NAMES[TILES[i][3]] + "{}x{}w{}".format(*TILES[i])


@pytest.fixture(params=range(len(TILES)), ids=_tile_id)
def tiles(request):
    from sparsebench import _C

    if request.param in WGMMA_TILES and not wgmma_available():
        pytest.skip("the wgmma kernel needs a compute capability 9.0 GPU and a build for sm_90")
    _C.set_tuning(tc_pairs=SPLIT, tc_gemm_tile=request.param, tc_wgmma=1)
    yield TILES[request.param]
    _C.set_tuning()


def gemm_case(seed):
    """A random channels_last conv the kernel takes (C a multiple of 8), as tests/test_tensor_kernels.py draws them."""
    return tensor_case(
        seed, in_channels=(8, 16, 24, 40, 64, 136), out_channels=(1, 5, 17, 32, 70, 130), channels_last=True
    )


@pytest.mark.parametrize("seed", range(30))
def test_random_conv_cases(seed, tiles):
    layer, x, relu = gemm_case(seed)
    plan = kernel_plan(x.shape, layer, dtype=x.dtype, channels_last=True)
    expect = ("tensor", SPLIT, tiles[0], tiles[1], tiles[3])
    assert (plan["variant"], plan["pairs"], plan["rows_per_block"], plan["TW"], plan["wgmma"]) == expect
    ref = reference(x, layer, relu)
    out = poisoned(ref.shape, x.dtype, channels_last=True)
    sparse_conv2d_into(out, x, layer, relu=relu)
    check(out, ref, x.dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("batch", [1, 7, 64, 300])
def test_linear(dtype, batch, tiles):
    check_linear(dtype, batch, in_features=304)  # a multiple of 8


@pytest.mark.parametrize("sparsity", [0.0, 0.99, 1.0])
def test_sparsity_extremes(sparsity, tiles):
    # 0.0: every k-step of every group runs its second half; 1.0: no nonzero, the output is the bias.
    layer = random_layer((33, 24, 3, 3), sparsity, padding=1, seed=3).to("cuda")
    x = torch.randn(4, 24, 11, 11, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    out = poisoned((4, 33, 11, 11), x.dtype, channels_last=True)
    sparse_conv2d_into(out, x, layer, variant="tensor")
    if sparsity == 1.0:
        assert torch.equal(out, layer.bias.half()[None, :, None, None].expand_as(out))
    else:
        check(out, reference(x, layer), x.dtype)


@pytest.fixture
def wgmma_on():
    from sparsebench import _C

    _C.set_tuning(tc_wgmma=1)  # the autotuner's candidates include the wgmma tiles
    yield
    _C.set_tuning()


def test_every_block_shape_is_a_distinct_plan_the_autotuner_times(wgmma_on):
    layer = random_layer((96, 64, 3, 3), 0.9, padding=1, seed=5).to("cuda")
    x = torch.randn(16, 64, 14, 14, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    ref = reference(x, layer, relu=True)
    gemm = []
    for plan in distinct_plans(x.shape, layer, dtype=x.dtype, channels_last=True, tensor=True):
        p = kernel_plan(x.shape, layer, plan=plan, dtype=x.dtype, channels_last=True)
        if p["pairs"] != SPLIT:
            continue
        gemm.append((p["rows_per_block"], p["TW"], 16 * p["MT"], p["wgmma"]))
        layer.tuned_plans = {(tuple(x.shape), x.dtype, x.device.index, True): plan}
        out = poisoned(ref.shape, x.dtype, channels_last=True)
        sparse_conv2d_into(out, x, layer, relu=True)
        check(out, ref, x.dtype)
    assert sorted(gemm) == sorted(TILES if wgmma_available() else TILES[: WGMMA_TILES[0]])


def test_where_it_cannot_run_the_direct_kernel_stands_in(tiles):
    # 3 input channels (VGG-16's first layer): knobs that name the implicit GEMM still run the whole network.
    layer = random_layer((16, 3, 3, 3), 0.5, padding=1, seed=2).to("cuda")
    x = torch.randn(2, 3, 8, 8, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    assert kernel_plan(x.shape, layer, dtype=x.dtype, channels_last=True)["pairs"] == 0
    check(sparse_conv2d(x, layer, relu=True), reference(x, layer, relu=True), x.dtype)
