"""The 2:4 weight stream (sparsebench/sparse/pairs.py), decoded on the CPU as the sparse MMA reads it."""

import pytest
import torch

from sparsebench.bench.config import KERNEL_TUNING
from sparsebench.sparse.codes import unsigned
from sparsebench.sparse.pairs import (
    GROUPS,
    PAIR_K,
    chunk_taps,
    load_ratio,
    mma_ratio,
    pair_stream,
    pair_stream_to_dense,
    split_pair_stream,
)
from sparsebench.sparse.split import SPLIT
from sparsebench.sparse.synthetic import random_layer
from sparsebench.sparse.tiles import fragment_stream, stream_to_dense
from tests.test_tiles import VALUES

ORDERED_NIBBLES = {0b0100, 0b1000, 0b1100, 0b1001, 0b1101, 0b1110}  # (first, second) position, ascending


def test_a_chunk_closes_before_a_third_nonzero_of_a_row():
    # Rows as bit sets: columns 10 and 11 hold row 0, so column 12 (row 0 again) starts a new chunk; the
    # closed chunk repeats its last column. Column 13 (row 1) joins; 14 and 15 (rows 0 and 2) fill it.
    positions = chunk_taps([10, 11, 12, 13, 14, 15, 16], [0b1, 0b1, 0b1, 0b10, 0b1, 0b100, 0b10])
    assert positions[:12] == [10, 11, 11, 11, 12, 13, 14, 15, 16, 16, 16, 16]
    assert len(positions) == PAIR_K and positions[12:] == [16] * 20
    assert chunk_taps([], []) == []


def test_dense_rows_fill_two_taps_a_chunk():
    positions = chunk_taps(list(range(8)), [0xFFFF] * 8)
    assert positions[:16] == [0, 1, 1, 1, 2, 3, 3, 3, 4, 5, 5, 5, 6, 7, 7, 7]


@pytest.mark.parametrize("shape", [(70, 33, 3, 3), (17, 130, 1, 1), (32, 7, 7, 7), (40, 300)])
@pytest.mark.parametrize("value, bits", VALUES)
@pytest.mark.parametrize(
    "sparsity, groups", [(0.0, 1), (0.5, 4), (0.9, 1), (0.9, 2), (0.9, 4), (0.99, 2), (1.0, 1), (1.0, 4)]
)
def test_the_stream_decodes_to_the_layer_as_the_sparse_mma_reads_it(shape, value, bits, sparsity, groups):
    conv = len(shape) == 4
    layer = random_layer(shape, sparsity, value=value, bits=bits, padding=1 if conv else 0, empty_rows=3, seed=7)
    stream = pair_stream(layer, torch.float16, groups)
    # Exactly the weights of the dense-MMA stream (the same rounding to fp16, the same codes).
    expected = stream_to_dense(layer, fragment_stream(layer, torch.float16))
    assert torch.equal(pair_stream_to_dense(layer, stream), expected)
    assert stream.pairs == groups and stream.kind == fragment_stream(layer, torch.float16).kind
    kptr = stream.kptr.to(torch.int64)
    assert kptr.numel() - 1 == -(-(layer.tile_kptr.numel() - 1) // groups)  # the last G-group may be short
    steps = stream.taps.numel() // PAIR_K
    assert int(kptr[0]) == 0 and bool((kptr % PAIR_K == 0).all()) and int(kptr[-1]) == stream.taps.numel()
    raw, meta = split_pair_stream(stream)
    lane_bytes = 16 if stream.kind == 0 else layer.bits  # 8 values a lane
    assert raw.numel() == steps * groups * 32 * lane_bytes and meta.numel() == steps * groups * 32
    assert (steps == 0) == (sparsity == 1.0)
    taps = unsigned(stream.taps)
    for g in range(kptr.numel() - 1):  # ascending in each group: the kernels' staging chunks compare codes
        assert bool((taps[kptr[g] + 1 : kptr[g + 1]] >= taps[kptr[g] : kptr[g + 1] - 1]).all())
    words = meta.view(steps * groups, 8, 4)
    assert bool((words[:, :, 2:] == 0).all())  # only lanes 4g and 4g + 1 carry metadata (selector 0)
    nibbles = torch.stack([(words[:, :, :2] >> (4 * i)) & 0xF for i in range(8)])
    assert set(nibbles.unique().tolist()) <= ORDERED_NIBBLES


def test_the_2_4_stream_halves_the_mmas_of_a_random_layer():
    # A 90%-random 3x3 layer: each group's taps are 78% of the columns, each channel uses 13% of them,
    # so chunks rarely close early; a dense layer gains nothing (two taps a chunk) and loses nothing.
    assert 0.5 < mma_ratio(random_layer((256, 256, 3, 3), 0.9, padding=1, seed=1)) < 0.54
    assert 0.5 < mma_ratio(random_layer((256, 256, 3, 3), 0.95, padding=1, seed=1)) < 0.53
    assert mma_ratio(random_layer((64, 64, 3, 3), 0.0, padding=1, seed=1)) == 1.0


def test_wider_steps_load_the_pixels_fewer_times_for_a_few_more_mmas():
    # One k-step for G groups: their 16G channels share the taps (the union of theirs), and a chunk closes
    # before any of them gets a third nonzero, so MMAs grow a little while pixel loads fall about G-fold.
    layer = random_layer((256, 256, 3, 3), 0.9, padding=1, seed=1)
    mmas = [mma_ratio(layer, g) for g in (1, 2, 4)]
    loads = [load_ratio(layer, g) for g in (1, 2, 4)]
    assert mmas[0] < mmas[1] < mmas[2] < 1.4 * mmas[0]
    assert loads[0] > 1.5 * loads[1] > 2.5 * loads[2]
    with pytest.raises(ValueError, match="groups: expected one of"):
        pair_stream(layer, torch.float16, 3)
    with pytest.raises(ValueError, match="groups: expected one of"):
        mma_ratio(random_layer((16, 16, 3, 3), 1.0, padding=1, seed=1), 3)  # a layer without nonzeros too


def test_the_config_check_of_tc_pairs_allows_what_the_streams_build():
    # bench/config.py keeps its own copy (it stays free of torch); 0 is the dense-MMA stream, SPLIT the
    # implicit-GEMM kernel's.
    allowed = KERNEL_TUNING["tc_pairs"][1]
    assert [g for g in range(17) if allowed(g)] == [0, *GROUPS, SPLIT]


@pytest.mark.parametrize("groups", [1, 2])
def test_bf16_values_and_codes_on_the_layers_device(groups):
    layer = random_layer((24, 16, 3, 3), 0.8, value="float32", padding=1, seed=4)
    stream = pair_stream(layer, torch.bfloat16, groups)
    assert stream.dtype == torch.bfloat16 and stream.values.device == layer.rowptr.device
    expected = stream_to_dense(layer, fragment_stream(layer, torch.bfloat16))
    assert torch.equal(pair_stream_to_dense(layer, stream), expected)
    assert stream.nbytes() == stream.values.numel() + stream.taps.numel() * 2 + stream.kptr.numel() * 4


def test_tap_codes_past_32767_read_as_unsigned():
    # 3000 input channels of a 3x3 kernel: codes ci << 4 reach 48000, stored in int16 as negative numbers.
    layer = random_layer((20, 3000, 3, 3), 0.995, value="linear", bits=4, padding=1, seed=5)
    stream = pair_stream(layer, torch.float16)
    assert stream.taps.dtype == torch.int16 and int(unsigned(stream.taps).max()) >= 32768
    expected = stream_to_dense(layer, fragment_stream(layer, torch.float16))
    assert torch.equal(pair_stream_to_dense(layer, stream), expected)
