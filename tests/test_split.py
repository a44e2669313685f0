"""The split 2:4 stream (sparsebench/sparse/split.py), decoded on the CPU as the implicit-GEMM kernel's MMAs read it."""

import pytest
import torch

from sparsebench.sparse.split import (
    FLAG4_WORD,
    FLAG_WORD,
    RECORD,
    SPLIT,
    gemm_entries,
    mma_ratio,
    split_stream,
    split_tiles,
    split_to_dense,
)
from sparsebench.sparse.synthetic import random_layer
from sparsebench.sparse.tiles import TC_HALF, TC_LINEAR


def _gemm_order(layer) -> torch.Tensor:
    """The dequantized weight as [CO, KH*KW*C] with taps in (kh, kw, ci) order."""
    w = layer.dequantize()
    if w.dim() == 2:
        return w
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


@pytest.mark.parametrize(
    "shape, sparsity, value, bits",
    [
        ((33, 16, 3, 3), 0.9, "float32", None),
        ((40, 24, 1, 1), 0.0, "linear", 8),  # dense: every chunk needs its second half
        ((17, 8, 5, 5), 0.5, "linear", 4),
        ((70, 40, 3, 3), 0.95, "codebook", 4),
        ((130, 64), 0.9, "float16", None),  # a linear layer
    ],
)
def test_the_stream_holds_every_weight_once_in_gemm_order(shape, sparsity, value, bits):
    layer = random_layer(shape, sparsity, value=value, bits=bits, padding=len(shape) > 2 and shape[2] // 2, seed=7)
    stream = split_stream(layer, torch.float16)
    assert stream.pairs == SPLIT and stream.values.dtype == torch.uint8
    groups = -(-layer.tile_rows.numel() // 16)
    k = layer.row_length
    assert stream.values.numel() == -(-k // 32) * (-(-groups // 8) * 8) * RECORD
    entries, present, kind = gemm_entries(layer)
    assert kind == (TC_LINEAR if value == "linear" else TC_HALF) == stream.kind
    decoded = split_to_dense(layer, stream)
    # The entries in fp16, each at its (kh, kw, ci) place: linear codes minus their zero point (exact), else values.
    assert torch.equal(decoded, entries.half().float())
    # The wgmma kernel runs second halves by the flag of four: the extra ones it runs hold zeros.
    assert torch.equal(split_to_dense(layer, stream, warpgroup=True), decoded)
    assert int(present.sum()) == layer.nnz
    if kind == TC_LINEAR:
        scaled = decoded * layer.scale[:, None]
        torch.testing.assert_close(scaled, _gemm_order(layer), rtol=0, atol=0)
    else:
        torch.testing.assert_close(decoded, _gemm_order(layer).half().float(), rtol=0, atol=0)


def test_each_half_keeps_two_nonzeros_a_chunk_and_the_second_only_the_rest():
    layer = random_layer((48, 32, 3, 3), 0.6, padding=1, seed=3)
    values, meta, second, _ = split_tiles(layer)
    # Every metadata nibble names two distinct ascending positions (the MMA's rule), first half and second.
    nib = torch.stack([(meta >> (4 * i)) & 0xF for i in range(8)], dim=-1)
    lanes = torch.arange(32) % 4 < 2
    nib = nib[:, :, :, lanes]
    assert bool(((nib & 3) < (nib >> 2)).all())
    # At 60% a 16-channel tile of 32 taps nearly always has a chunk of three nonzeros or more.
    assert second.shape == (-(-layer.row_length // 32), 8) and bool(second[:, :3].all())
    assert not bool(second[:, 3:].any())  # the padding groups past the layer's 3 stay empty


def test_the_flag_of_four_is_the_or_of_each_aligned_four_groups_flags():
    layer = random_layer((100, 16, 3, 3), 0.93, padding=1, seed=5)  # 7 groups, padded to 8
    stream = split_stream(layer, torch.float16)
    steps = -(-layer.row_length // 32)
    words = stream.values.view(steps, 8, RECORD)[..., 1024:].contiguous().view(torch.int32)
    flag, flag4 = words[..., FLAG_WORD], words[..., FLAG4_WORD]
    _, _, second, _ = split_tiles(layer)
    assert torch.equal(flag.bool(), second)
    expect = second.view(steps, 2, 4).any(-1)  # groups 0-3 and 4-7
    assert torch.equal(flag4.bool(), expect.repeat_interleave(4, dim=1))
    assert bool(second.any()) and not bool(second.all()) and bool((flag4.bool() & ~flag.bool()).any())


@pytest.mark.parametrize(
    "sparsity, low, high, low4, high4",
    [(0.0, 1.0, 1.0, 1.0, 1.0), (0.9, 0.6, 0.8, 0.85, 1.0), (0.95, 0.5, 0.6, 0.55, 0.7), (1.0, 0.5, 0.5, 0.5, 0.5)],
)
def test_mma_ratio_counts_the_second_halves(sparsity, low, high, low4, high4):
    layer = random_layer((64, 64, 3, 3), sparsity, padding=1, seed=11)
    assert low <= mma_ratio(layer) <= high
    assert low4 <= mma_ratio(layer, warpgroup=True) <= high4
    assert mma_ratio(layer, warpgroup=True) >= mma_ratio(layer)


def test_bf16_stream_and_the_layers_device():
    layer = random_layer((24, 16, 3, 3), 0.8, value="float32", padding=1, seed=4)
    stream = split_stream(layer, torch.bfloat16)
    assert stream.dtype == torch.bfloat16 and stream.values.device == layer.rowptr.device
    entries, _, _ = gemm_entries(layer)
    assert torch.equal(split_to_dense(layer, stream), entries.bfloat16().float())


def test_a_layer_without_tiles_is_refused_by_name():
    layer = random_layer((16, 8, 3, 3), 0.9, padding=1, seed=1)
    layer.tile_kptr = None
    with pytest.raises(ValueError, match="^layer: has no tensor-core tiles"):
        split_stream(layer, torch.float16)
