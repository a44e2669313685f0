"""The kernels' dispatcher (cuda/dispatch.cu) through ``kernel_plan``: no GPU needed, since planning
only reads the SM count (an H200's 132 when no device answers). Needs the compiled module."""

import re

import pytest
import torch

from sparsebench.sparse.ops import _C
from sparsebench.sparse.ops import kernel_plan as plan
from sparsebench.sparse.split import SPLIT
from sparsebench.sparse.synthetic import random_layer


def _other_gpu() -> bool:
    """The expected plans are an H200's (132 SMs): what the module assumes without a GPU."""
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_properties(0).multi_processor_count != 132


pytestmark = [
    pytest.mark.skipif(_C is None, reason="sparsebench._C is not built here"),
    pytest.mark.skipif(_other_gpu(), reason="the expected plans are for an H200's 132 SMs"),
]


@pytest.fixture
def tuning():
    yield _C.set_tuning
    _C.set_tuning()


def test_warps_per_row_follow_the_grid_and_the_longest_row(tuning):
    deep = random_layer((512, 512, 3, 3), 0.9, padding=1, seed=1)  # 512 rows of ~461 nonzeros
    assert plan((1, 512, 2, 2), deep)["warps_per_row"] == 4  # 512 warps cannot fill the GPU
    assert plan((64, 512, 2, 2), deep)["warps_per_row"] == 1  # 8192 warps of even work: no split
    skewed = random_layer((512, 512, 3, 3), 0.9, padding=1, row_skew=1.5, seed=1)
    assert skewed.row_nnz_max > 8 * skewed.nnz / 512
    assert plan((64, 512, 2, 2), skewed)["warps_per_row"] == 4  # the longest row would be the tail
    many = random_layer((256, 64, 3, 3), 0.9, padding=1, seed=2)  # ~58 nonzeros a row, 32 pixel tiles
    p = plan((32, 64, 4, 4), many)
    assert (p["variant"], p["warps_per_row"], p["rows_per_block"]) == ("rowsplit", 1, 4)
    for seed in range(5):  # ~8 nonzeros a row, the longest several times that: added lanes would idle
        classifier = random_layer((10, 84), 0.9, row_skew=1.0, seed=seed)
        assert plan((1, 84), classifier)["warps_per_row"] == 1
    wide = random_layer((66000, 300), 0.1, seed=4)
    tuning(rowsplit_warps_per_row=4)  # 66000 rows at one per warp of a 4-warp block: the grid's y limit allows 2
    assert plan((1, 300), wide)["warps_per_row"] == 2


def test_plan_candidates_are_distinct_knob_settings_that_the_plans_follow():
    from sparsebench.sparse.ops import plan_candidates

    candidates = plan_candidates()
    keys = [tuple(sorted(c.items())) for c in candidates]
    assert len(set(keys)) == len(candidates) > 100
    assert {c["variant"] for c in candidates} == {"stage", "rowsplit", "tensor"}
    layer = random_layer((128, 128, 3, 3), 0.9, padding=1, seed=3)
    shape = (32, 128, 28, 28)
    for i, c in enumerate(candidates):
        p = plan(shape, layer, plan=i)
        if c["variant"] == "tensor":  # fp32 activations cannot use the tensor cores: the rule runs instead
            assert p == plan(shape, layer)
            half = plan(shape, layer, plan=i, dtype=torch.float16)
            if c["tc_pairs"] == SPLIT:  # the implicit-GEMM kernel: channels_last only, the direct kernel stands in
                assert (half["variant"], half["pairs"]) == ("tensor", 0)
                cl = plan(shape, layer, plan=i, dtype=torch.float16, channels_last=True)
                assert (cl["variant"], cl["pairs"]) == ("tensor", SPLIT)
                continue
            # A warp of a 2:4 plan with G groups a k-step holds MT x G x 2 accumulator tiles: MT shrinks to 8 / G.
            mt = min(c["tc_mt"], 8 // c["tc_pairs"]) if c["tc_pairs"] > 1 else c["tc_mt"]
            assert (half["variant"], half["MT"], half["pairs"]) == ("tensor", mt, c["tc_pairs"])
            assert half["warps_k"] <= c["tc_warps_k"] and half["smem_bytes"] <= c["tc_smem_budget"]
            continue
        assert p["variant"] == c["variant"]
        if c["variant"] == "stage":
            assert p["V"] == c["stage_v"] and p["smem_bytes"] <= c["smem_budget"]
            assert p["TWv"] == (30 if c["virtual_width"] else 28)  # 28-wide rows: lanes sweep the 2 halo columns
        else:
            assert p["warps_per_row"] == c["rowsplit_warps_per_row"]
    distinct = {tuple(sorted(plan(shape, layer, plan=i).items())) for i in range(-1, len(candidates))}
    assert 8 <= len(distinct) < len(candidates)  # many candidates coincide on one shape
    assert plan(shape, layer) == plan(shape, layer, plan=-1)
    with pytest.raises(ValueError, match="plan: a candidate plan picks its own kernel"):
        plan(shape, layer, variant="stage", plan=0)
    with pytest.raises(ValueError, match=rf"plan: expected -1 .* 0\.\.{len(candidates) - 1}, got {len(candidates)}"):
        plan(shape, layer, plan=len(candidates))


def test_stage_v_knob(tuning):
    layer = random_layer((256, 128, 3, 3), 0.9, padding=1, seed=6)
    assert plan((32, 128, 8, 8), layer)["V"] == 2  # the rule: the widest V whose grid still fills the GPU
    tuning(stage_v=4)
    assert plan((32, 128, 8, 8), layer)["V"] == 4
    assert _C.get_tuning()["stage_v"] == 4
    with pytest.raises(ValueError, match="stage_v: expected 0"):
        tuning(stage_v=3)


def test_starved_grids_take_fewer_rows_per_block(tuning):
    # A 1x1 layer at batch 1: 3136 pixels make 98 tiles of 32 (V=1); the reuse rule alone (~240 rows
    # per block) would leave one row group, 98 blocks for 132 SMs.
    layer = random_layer((256, 64, 1, 1), 0.9, seed=7)
    p = plan((1, 64, 56, 56), layer)
    assert (p["variant"], p["flattened"], p["V"], p["rows_per_block"], p["blocks"]) == ("stage", True, 1, 86, 294)
    tuning(min_rows=16, blocks_per_sm=4)  # aim for 4 blocks per SM: 6 row groups
    assert plan((1, 64, 56, 56), layer)["rows_per_block"] == 43
    assert plan((32, 64, 56, 56), layer)["rows_per_block"] == 256  # a full grid keeps its reuse


def test_linear_lanes_and_vector_loads_are_planned_where_they_apply():
    conv3 = random_layer((128, 128, 3, 3), 0.9, padding=1, seed=8)
    assert plan((32, 128, 28, 28), conv3)["linear"]  # 28 wide + 2 halo columns: lanes span whole staged rows
    assert not plan((32, 128, 32, 32), conv3)["linear"]  # 32 wide: no halo sweep, rows of 34 staged floats
    assert not plan((32, 128, 28, 28), random_layer((128, 128, 3, 3), 0.9, stride=2, padding=1))["linear"]
    one = random_layer((256, 1024, 1, 1), 0.8, seed=9)
    assert plan((1, 1024, 14, 14), one)["vector_loads"]  # one image of 196 pixels: 16-pixel tiles inside it
    assert not plan((2, 1024, 14, 14), one)["vector_loads"]  # tiles would cross images
    assert plan((2, 1024, 4, 4), one)["vector_loads"]  # images of 16 pixels
    assert not plan((1, 1024), random_layer((256, 1024), 0.8))["vector_loads"]  # linear: pixels are batch rows


def test_tensor_plans_cover_every_pixel_and_fit_the_gpu():
    # Random geometries through every tensor-core candidate: a plan (or the fallback to CUDA cores) comes
    # back, its warps cover the tile's pixel groups, and its shared memory fits an H200 block.
    import random

    from sparsebench.sparse.ops import _planner

    rnd = random.Random(0)
    candidates = [i for i, c in enumerate(_C.plan_candidates()) if c["variant"] == "tensor"]
    for _ in range(25):
        k = rnd.choice([1, 3, 5, 7])
        stride, pad = rnd.choice([1, 2, 3]), rnd.choice([0, k // 2])
        cin, cout = rnd.choice([1, 3, 17, 64, 256, 1024]), rnd.choice([1, 5, 16, 70, 512])
        hw = rnd.choice([k, 2, 4, 7, 14, 28, 56])
        hw = max(hw, k - 2 * pad)
        layer = random_layer((cout, cin, k, k), 0.9, stride=stride, padding=pad, value="linear", bits=4, seed=k)
        shape = (rnd.choice([1, 3, 32, 128]), cin, hw, hw)
        planner = _planner(shape, layer, dtype=torch.float16)  # kernel_plan's, its geometry worked out once
        for i in [-1] + candidates:
            p = planner(i)
            if p["variant"] != "tensor":
                continue
            if p["pairs"] == SPLIT:  # the implicit-GEMM kernels: warps (wgmma: warpgroups) over pixels x groups
                warp_threads = 128 if p["wgmma"] else 32
                assert p["warps_m"] * p["warps_g"] * warp_threads == p["threads"] and 0 < p["smem_bytes"] <= 227 * 1024
                assert p["blocks"] == -(-shape[0] * hw * hw // p["TW"]) * -(-layer.tile_groups // (4 * p["warps_g"]))
                continue
            groups = p["NB"] * p["TH"] * p["TWp"] // 8
            assert p["warps_m"] * p["MT"] * 2 >= groups, (shape, p)
            assert p["warps_m"] * p["warps_k"] * p["warps_g"] == 8 and 0 < p["smem_bytes"] <= 227 * 1024
            assert 1 <= p["CC"] <= cin and p["chunks"] * p["CC"] >= cin and p["blocks"] >= 1


def test_distinct_plans_of_one_kernel_family():
    from sparsebench.sparse.ops import distinct_plans

    layer = random_layer((64, 48, 3, 3), 0.9, padding=1, seed=5)
    shape = (8, 48, 14, 14)
    every = distinct_plans(shape, layer, dtype=torch.float16)
    tensor = distinct_plans(shape, layer, dtype=torch.float16, tensor=True)
    cuda_cores = distinct_plans(shape, layer, dtype=torch.float16, tensor=False)
    assert tensor and cuda_cores and sorted(tensor + cuda_cores) == sorted(every)
    assert {plan(shape, layer, plan=p, dtype=torch.float16)["variant"] for p in tensor} == {"tensor"}
    assert "tensor" not in {plan(shape, layer, plan=p, dtype=torch.float16)["variant"] for p in cuda_cores}


def test_narrow_images_go_side_by_side_unless_the_knob_says_one_a_band(tuning):
    layer = random_layer((256, 256, 3, 3), 0.9, padding=1, seed=2)
    shape = (128, 256, 14, 14)
    packed = plan(shape, layer, variant="tensor", dtype=torch.float16)
    assert (packed["P"], packed["TWp"]) == (4, 56)  # four 14-column images fill 56 columns: none padded
    tuning(tc_pack_images=0)
    banded = plan(shape, layer, variant="tensor", dtype=torch.float16)
    assert (banded["P"], banded["TWp"]) == (1, 16) and banded["TH"] > packed["TH"]  # taller: less halo
    assert {c["tc_pack_images"] for c in _C.plan_candidates() if c["variant"] == "tensor"} == {0, 1}


def _plan_every_geometry(seed: int, results) -> None:
    """Plan random geometries, wide kernels among them, with the rule and every candidate; put the count
    of plans checked (or the failure) on ``results``."""
    import random

    from sparsebench.sparse.ops import _planner, plan_candidates

    rnd = random.Random(seed)
    checked = 0
    # fp32 runs a tensor-core candidate as the rule (checked once, as -1): only the CUDA-core ones differ.
    cuda_core = [-1] + [i for i, c in enumerate(plan_candidates()) if c["variant"] != "tensor"]
    ids = {torch.float32: cuda_core, torch.float16: range(-1, _C.plan_candidate_count())}
    try:
        for _ in range(40):
            kh, kw = rnd.choice([1, 2, 3, 5, 7, 11]), rnd.choice([1, 3, 7, 31, 32, 33, 41, 64, 65, 129])
            stride, pad = rnd.choice([1, 2, 3]), rnd.choice([0, 1, kw // 2])
            cin, cout = rnd.choice([1, 3, 8, 64, 513]), rnd.choice([1, 5, 16, 70])
            h, w = max(kh, rnd.choice([1, 2, 7, 33])), max(kw - 2 * min(pad, kw // 2), rnd.choice([1, 8, 56, 130]))
            layer = random_layer((cout, cin, kh, kw), 0.9, stride=stride, padding=pad, value="linear", bits=4, seed=kw)
            shape = (rnd.choice([1, 2, 32, 129]), cin, h, w)
            for dtype in (torch.float32, torch.float16):
                planner = _planner(shape, layer, dtype=dtype)  # kernel_plan's, its geometry worked out once
                for i in ids[dtype]:
                    p = planner(i)
                    assert p["blocks"] >= 1 and p["threads"] >= 32, (shape, layer.weight_shape, i, p)
                    if p["variant"] == "stage":
                        assert min(p["TW"], p["TWv"], p["TH"], p["NI"], p["CC"], p["chunks"]) >= 1, (shape, i, p)
                    checked += 1
        results.put(checked)
    except BaseException as e:  # noqa: BLE001 - the parent reports it
        results.put(f"{type(e).__name__}: {e}")


def test_the_planner_ends_with_a_launchable_plan_for_every_geometry():
    # Kernels as wide as the lanes or wider (1-D convolutions as 2-D: 1x41) once drove the staged
    # kernel's tile width to zero or below, and the planner into an endless loop. In a child process:
    # a planner that never returns fails the test instead of hanging it.
    import multiprocessing
    import queue

    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=_plan_every_geometry, args=(0, results))
    child.start()
    try:
        outcome = results.get(timeout=240)
    except queue.Empty:
        outcome = "the planner did not return within 240 s"
    child.join(5)
    if child.is_alive():
        child.terminate()
    assert isinstance(outcome, int) and outcome > 1000, outcome


def test_the_plan_kind_is_marked_constant_for_torch_compile_as_torch_marks_it():
    """ops marks _plan_pairs itself (torch's decorator imports torch._dynamo, seconds of every start)."""
    from sparsebench.sparse import ops

    def probe(plan: int) -> int:
        return plan

    marked = torch.compiler.assume_constant_result(probe)
    assert vars(marked) and vars(ops._plan_pairs).items() >= vars(marked).items()


@pytest.mark.parametrize(
    "knob, value, allowed",
    [
        ("smem_budget", 4096, "8192..232448 bytes"),
        ("stage_v", 3, "0 (automatic), 1, 2 or 4"),
        ("tc_mt", 3, "1, 2, 4 or 8"),
        ("tc_pixels", 2048, "16..1024"),
        ("tc_pairs", 3, "0 (the dense-MMA stream), 1, 2, 4"),
    ],
)
def test_set_tuning_refuses_a_knob_outside_its_range_by_name(tuning, knob, value, allowed):
    before = _C.get_tuning()
    with pytest.raises(ValueError, match=rf"^{knob}: expected {re.escape(allowed)}"):
        tuning(**{knob: value})
    assert _C.get_tuning() == before  # nothing half-set


def test_channels_last_at_stride_1_stages_whole_channel_pairs(tuning):
    """channels_last at stride 1 with an even channel count and one image a band stages two channels a thread
    (one 4-byte load a column: the plan's vector_loads), so every chunk holds whole pairs, whatever the
    budget leaves room for; NCHW, odd counts, strides and images side by side stage one channel a thread."""
    half = dict(dtype=torch.float16, channels_last=True)
    layer = random_layer((64, 70, 3, 3), 0.9, padding=1, seed=5)
    for budget_kb in (40, 44, 48, 56, 96):  # one channel a thread would stage 4, 7, 9, 15, 43 a chunk
        tuning(tc_smem_budget=budget_kb * 1024)
        p = plan((8, 70, 32, 32), layer, **half)
        assert (p["variant"], p["P"], p["vector_loads"]) == ("tensor", 1, True)
        assert p["CC"] % 2 == 0 and p["CC"] * p["chunks"] >= 70 > p["CC"] * (p["chunks"] - 1)
    tuning()
    assert not plan((8, 70, 32, 32), layer, dtype=torch.float16)["vector_loads"]  # NCHW
    odd = random_layer((64, 69, 3, 3), 0.9, padding=1, seed=5)
    assert not plan((8, 69, 32, 32), odd, **half)["vector_loads"]
    strided = random_layer((64, 70, 3, 3), 0.9, stride=2, padding=1, seed=5)
    assert not plan((8, 70, 32, 32), strided, **half)["vector_loads"]
    side_by_side = plan((8, 70, 28, 28), layer, **half)  # 28-wide maps go two to a band
    assert side_by_side["P"] == 2 and not side_by_side["vector_loads"]


def test_the_implicit_gemm_kernel_plans_channels_last_inputs_of_whole_16_byte_units(tuning):
    """tc_pairs = SPLIT picks the implicit-GEMM kernel, its block tile kGemmTiles[tc_gemm_tile] (channels x pixels a
    block, pixels a warp), a grid over both; only channels_last input (or a linear layer's) with a multiple of 8
    channels, which it reads 16 bytes at a time. The autotuner's candidates hold each tile once."""
    from sparsebench.sparse.ops import distinct_plans
    from tests.test_gemm_kernels import TILES

    tiles = [(rows, width, warp) for rows, width, warp, _ in TILES]  # wgmma's: a warpgroup's pixels
    half = dict(dtype=torch.float16, channels_last=True)
    layer = random_layer((200, 64, 3, 3), 0.9, padding=1, seed=5)  # 13 groups of 16 channels
    for i, (rows, width, warp) in enumerate(tiles):
        tuning(tc_pairs=SPLIT, tc_gemm_tile=i, tc_wgmma=1)
        p = plan((3, 64, 10, 10), layer, **half)  # 300 pixels
        assert (p["variant"], p["pairs"], p["rows_per_block"], p["TW"], 16 * p["MT"], p["wgmma"]) == (
            "tensor",
            SPLIT,
            rows,
            width,
            warp,
            (i >= 7) + (i >= 11),  # cuda/sparsebench.h GemmMma: mma.sync, wgmma, wgmma + warps' mma.sync
        )
        warps = 4 * (rows // 64) if p["wgmma"] else (rows // 64) * (width // warp)  # warpgroups of 4 warps
        assert p["threads"] == 32 * warps and warps == (4 if p["wgmma"] else 1) * p["warps_g"] * p["warps_m"]
        assert p["blocks"] == -(-300 // width) * -(-13 // (rows // 16)) and p["vector_loads"]
    assert plan((3, 64, 10, 10), layer, dtype=torch.float16)["pairs"] != SPLIT  # NCHW: the CUDA cores
    odd = random_layer((32, 20, 3, 3), 0.9, padding=1, seed=5)  # 20 channels: the direct kernel stands in
    assert (lambda p: (p["variant"], p["pairs"]))(plan((3, 20, 10, 10), odd, **half)) == ("tensor", 0)
    fc = random_layer((100, 72), 0.9, seed=5)
    assert plan((33, 72), fc, "tensor", dtype=torch.float16)["pairs"] == SPLIT  # [N, C] is channels_last too
    with pytest.raises(ValueError, match=r"^tc_gemm_tile: expected 0\.\.14"):
        tuning(tc_gemm_tile=15)
    with pytest.raises(ValueError, match=r"^tc_wgmma: expected 0 or 1"):
        tuning(tc_wgmma=2)
    # The wgmma tiles run only with tc_wgmma = 1: else a plan naming one is the mma.sync kernel's first tile's.
    tuning(tc_pairs=SPLIT, tc_gemm_tile=0)
    first = plan((3, 64, 10, 10), layer, **half)
    tuning(tc_pairs=SPLIT, tc_gemm_tile=7)
    assert plan((3, 64, 10, 10), layer, **half) == first and first["wgmma"] == 0
    for wgmma in (0, 1):
        tuning(tc_wgmma=wgmma)
        shapes = []
        for cand in distinct_plans((3, 64, 10, 10), layer, tensor=True, **half):
            p = plan((3, 64, 10, 10), layer, plan=cand, **half)
            if p["pairs"] == SPLIT:
                shapes.append((p["rows_per_block"], p["TW"], 16 * p["MT"]))
        assert sorted(shapes) == sorted(tiles if wgmma else tiles[:7])
    assert not any(
        plan((3, 20, 10, 10), odd, plan=c, **half)["pairs"] == SPLIT
        for c in distinct_plans((3, 20, 10, 10), odd, tensor=True, **half)
    )


@pytest.mark.parametrize(
    "wshape, xshape, channels_last",
    [
        ((32, 64, 3, 3), (2, 64, 9, 9), True),
        ((32, 64, 3, 3), (2, 64, 9, 9), False),
        ((32, 20, 3, 3), (2, 20, 9, 9), True),
        ((16, 3, 3, 3), (2, 3, 9, 9), True),
        ((40, 72, 1, 1), (5, 72, 1, 1), False),  # 1x1 images: both layouts
        ((40, 72), (5, 72), False),  # a linear layer
        ((40, 60), (5, 60), False),
    ],
)
def test_the_streams_choice_matches_the_dispatchers_for_the_implicit_gemm(tuning, wshape, xshape, channels_last):
    """With tc_pairs = SPLIT the caller passes the split stream exactly where the dispatcher plans the implicit
    GEMM, and the dense-MMA stream where the direct kernel stands in for it (else the call stops on a mismatch)."""
    from sparsebench.sparse.ops import _gemm_capable

    layer = random_layer(wshape, 0.9, padding=1 if len(wshape) == 4 and wshape[2] == 3 else 0, seed=2)
    x = torch.zeros(xshape, dtype=torch.float16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    tuning(tc_pairs=SPLIT)
    p = plan(xshape, layer, "tensor", dtype=torch.float16, channels_last=channels_last)
    assert p["variant"] == "tensor" and (p["pairs"] == SPLIT) == _gemm_capable(x, layer)
    assert _gemm_capable(x, layer) == (wshape[1] % 8 == 0 and (channels_last or xshape[2:] in ((), (1, 1))))
