"""The tensor-core tiles (groups of 16 channels, condensed taps) and the weight stream, on the CPU."""

import json

import pytest
import torch

from sparsebench.sparse.codes import unsigned
from sparsebench.sparse.format import check_tiles, load_packed, pack_weight, save_packed
from sparsebench.sparse.synthetic import random_layer
from sparsebench.sparse.tiles import (
    TC_CODEBOOK,
    TC_HALF,
    TC_LINEAR,
    TILE_K,
    TILE_ROWS,
    build_tiles,
    fragment_stream,
    group_channels,
    stream_kind,
    stream_to_dense,
    tap_bits,
    tap_code_dtype,
    tap_codes,
)

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


def union_fraction(mask, rows):
    groups = rows.view(-1, TILE_ROWS)
    used = 0
    for g in groups:
        live = g[g >= 0]
        used += int(mask[live].any(dim=0).sum())
    return used / (groups.shape[0] * mask.shape[1])


@pytest.mark.parametrize("co, k, sparsity", [(64, 576, 0.9), (70, 300, 0.95), (5, 27, 0.5), (512, 4608, 0.9)])
def test_tiles_cover_every_nonzero_with_sorted_padded_taps(co, k, sparsity):
    gen = torch.Generator().manual_seed(co)
    mask = torch.rand(co, k, generator=gen) > sparsity
    mask[0] = False  # an empty channel
    rows, kptr, cols = build_tiles(mask)
    assert sorted(rows[rows >= 0].tolist()) == list(range(co)) and rows.numel() == -(-co // 16) * 16
    assert int(kptr[0]) == 0 and bool((kptr % TILE_K == 0).all()) and int(kptr[-1]) == cols.numel()
    for g in range(kptr.numel() - 1):
        taps = cols[kptr[g] : kptr[g + 1]]
        assert bool((taps[1:] >= taps[:-1]).all())
        members = rows[16 * g : 16 * g + 16]
        need = mask[members[members >= 0]].any(dim=0).nonzero().flatten()
        assert torch.equal(torch.unique(taps), need) or (need.numel() == 0 and taps.numel() == 0)
        assert taps.numel() - need.numel() < TILE_K  # padding only rounds up to the next k-step


def test_grouping_by_similarity_condenses_more_than_by_length():
    gen = torch.Generator().manual_seed(0)
    # Two families of channels with different column sets, interleaved: grouping by similarity finds them.
    base = torch.rand(2, 512, generator=gen) > 0.7
    mask = torch.stack([base[i % 2] & (torch.rand(512, generator=gen) > 0.3) for i in range(64)])
    by_length, by_similarity = group_channels(mask, False), group_channels(mask, True)
    assert union_fraction(mask, by_similarity) < 0.8 * union_fraction(mask, by_length)
    random_mask = torch.rand(512, 4608, generator=gen) > 0.9
    assert union_fraction(random_mask, group_channels(random_mask)) < union_fraction(
        random_mask, group_channels(random_mask, False)
    )


@pytest.mark.parametrize("value, bits", VALUES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_stream_decodes_to_the_layer(value, bits, per_channel):
    if per_channel and value != "codebook":
        pytest.skip("per-channel codebooks only")
    layer = random_layer(
        (37, 20, 3, 3), 0.9, value=value, bits=bits, per_channel=per_channel, empty_rows=4, padding=1, seed=7
    )
    for dtype in (torch.float16, torch.bfloat16):
        stream = fragment_stream(layer, dtype)
        want = {"linear": TC_LINEAR, "codebook": TC_CODEBOOK}.get(value, TC_HALF)
        assert stream.kind == want == stream_kind(layer)
        dense = layer.dequantize().reshape(37, -1)
        got = stream_to_dense(layer, stream)
        if stream.kind == TC_HALF:  # rounded to the activation dtype
            assert torch.allclose(got, dense.to(dtype).float(), rtol=0, atol=0)
        else:
            assert torch.equal(got, dense)
        if stream.kind != TC_HALF:
            assert stream.values.numel() == int(layer.tile_kptr[-1]) // TILE_K * 32 * bits


def test_linear_zero_point_outside_the_codes_falls_back_to_values():
    w = torch.tensor([[1.0, 0.0, 3.0, 0.0]] * 3)
    layer = pack_weight(w, bits=4, codes=torch.tensor([[1, 0, 3, 0]] * 3), scale=1.0, zero_point=0)
    assert stream_kind(layer) == TC_LINEAR
    shifted = pack_weight(w + 16.0 * 0, bits=8, codes=torch.tensor([[17, 16, 19, 16]] * 3), scale=1.0, zero_point=16)
    assert stream_kind(shifted) == TC_LINEAR
    shifted.zero_point = torch.full((3,), 300, dtype=torch.int32)  # no 8-bit code decodes to zero
    assert stream_kind(shifted) == TC_HALF


def test_version_2_files_keep_the_tiles_and_version_1_files_get_them(tmp_path):
    from safetensors.torch import load_file, save_file

    layer = random_layer((40, 24, 3, 3), 0.9, value="linear", bits=4, padding=1, seed=3)
    save_packed(tmp_path / "v2.safetensors", {"conv": layer})
    loaded, _ = load_packed(tmp_path / "v2.safetensors")
    for name in ("tile_rows", "tile_kptr", "tile_cols"):
        assert torch.equal(getattr(loaded["conv"], name), getattr(layer, name))
    # A version-1 file: the same tensors without tiles.
    from safetensors import safe_open

    with safe_open(str(tmp_path / "v2.safetensors"), framework="pt") as f:
        meta = f.metadata()
    tensors = {k: v for k, v in load_file(str(tmp_path / "v2.safetensors")).items() if "/tile_" not in k}
    index = json.loads(meta["layers"])
    for entry in index.values():
        entry["sha256"] = {k: v for k, v in entry["sha256"].items() if not k.startswith("tile_")}
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata={**meta, "version": "1", "layers": json.dumps(index)})
    old, _ = load_packed(tmp_path / "v1.safetensors")
    assert old["conv"].has_tiles and torch.equal(old["conv"].tile_cols, layer.tile_cols)
    assert old["conv"].footprint_bytes() == layer.footprint_bytes() and layer.tile_bytes() > 0


def test_check_tiles_refuses_a_missing_tap():
    layer = random_layer((20, 8, 3, 3), 0.7, padding=1, seed=4)
    check_tiles(layer)
    cols = unsigned(layer.tile_cols)
    first = int(layer.tile_kptr[1]) - 1  # group 0's last tap (or a repeat of it)
    broken = layer.tile_cols.clone()
    broken[: first + 1] = int(cols[0])  # group 0 now lists only its first tap
    layer.tile_cols = broken
    with pytest.raises(ValueError, match="missing from its group's taps"):
        check_tiles(layer, "conv")


@pytest.mark.parametrize(
    "shape, dtype",
    [
        ((40, 19, 3, 3), torch.int16),  # 2 bits for kh and kw: ci << 4
        ((24, 130, 1, 1), torch.int16),  # 1x1: the code is ci
        ((16, 9, 7, 7), torch.int16),  # 3 bits each
        ((16, 5, 1, 11), torch.int16),  # a 1x11 kernel: 4 bits each, kh always 0
        ((16, 4100, 3, 3), torch.int32),  # 4100 << 4 does not fit 16 bits (4096 << 4 would, just)
    ],
)
def test_tap_codes_split_into_the_columns_channel_row_and_tap(shape, dtype):
    layer = random_layer(shape, 0.9, value="float16", padding=shape[2] // 2, seed=2)
    _, cin, kh_n, kw_n = shape
    b = tap_bits((kh_n, kw_n))
    codes = tap_codes(layer)
    assert codes.dtype == dtype == tap_code_dtype(layer) and codes.shape == layer.tile_cols.shape
    c = unsigned(codes)
    ci, kh, kw = c >> (2 * b), (c >> b) & ((1 << b) - 1), c & ((1 << b) - 1)
    assert torch.equal((ci * kh_n + kh) * kw_n + kw, unsigned(layer.tile_cols))  # every tap decodes back
    assert int(ci.max()) < cin and int(kh.max()) < kh_n and int(kw.max()) < kw_n
    kptr = layer.tile_kptr.tolist()
    for g in range(len(kptr) - 1):  # still ascending in each group: the kernels' chunk bounds compare codes
        assert bool((c[kptr[g] + 1 : kptr[g + 1]] >= c[kptr[g] : kptr[g + 1] - 1]).all())
