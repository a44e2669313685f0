"""The 2:4 weight stream: a group's condensed taps packed so that the sparse tensor cores can skip half.

``mma.sp.m16n8k32`` multiplies a 16 x 32 A that holds at most two nonzeros in each row's four-column
chunk, stored compressed (16 x 16) with 2-bit indices, at the cost of a dense m16n8k16: twice the
work per MMA. Here A is a group's 16 output channels x 32 of its condensed taps. A 90%-sparse group
uses 78% of the taps but each channel only 13% of them, so four consecutive taps almost never hold
three nonzeros of one channel: ``chunk_taps`` walks the group's taps in ascending order and closes a
chunk early where one would (the rest of the chunk repeats its last tap with zero weights). The taps
stay ascending, so the kernels' chunking of the staged input works unchanged, and a layer needs about
0.52x the MMAs of the dense-MMA stream at 90% (``mma_ratio``).

The stream (``pair_stream``) is a ``FragmentStream`` with ``pairs=True``: every k-step (32 taps) is 32
lanes' 8 values (or codes) in the order of the A fragment, then 32 lanes' metadata words, and it
carries its own ``kptr`` (each group's first tap, multiples of 32) and ``taps`` (tap codes). Lane l
(g = l // 4, q = l % 4) holds register r = 2 * (chunk // 4) + (row >= 8) for row g or g + 8 and chunk
q or q + 4; value 2r + e is at the e-th position its metadata names (a lone nonzero at position 3 is
stored second, a zero at position 2 first). Lane 4g + h (h = 0, 1) holds the
metadata of chunks 4h..4h+3 of rows g (bits 0-15) and g + 8 (bits 16-31), a nibble a chunk: the two
positions (first in the low bits, ascending), as ``mma.sp::ordered_metadata`` reads them.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

from sparsebench.sparse.codes import pack_codes, unpack_codes, unsigned
from sparsebench.sparse.tiles import (
    TC_HALF,
    FragmentStream,
    places_to_dense,
    stream_kind,
    tap_codes_of,
    tap_columns,
    zero_filled_codes,
)

PAIR_K = 32  # logical taps per k-step: the K of one mma.sp.m16n8k32
CHUNK = 4  # taps a 2:4 chunk spans (at most two nonzeros a row)
ROWS = 16  # channels a group: the M of the MMA
CHUNKS_PER_STEP = PAIR_K // CHUNK


def chunk_taps(cols: List[int], rows: List[int]) -> List[int]:
    """The positions of one group's k-steps: each position's flat column, a multiple of 32 long.

    ``cols`` ascending, ``rows[i]`` the bit set of the group's rows (slots) that use ``cols[i]``. A chunk
    takes the next column unless it is full or a row would hold a third nonzero; then its free positions
    repeat its last column (zero weights) and a new chunk starts. The last k-step is padded the same way."""
    out: List[int] = []
    one = two = fill = 0
    for c, m in zip(cols, rows):
        if fill == CHUNK or two & m:
            out.extend([out[-1]] * (CHUNK - fill))
            one = two = fill = 0
        two |= one & m
        one |= m
        out.append(c)
        fill += 1
    if out:
        out.extend([out[-1]] * (-len(out) % PAIR_K))
    return out


def _nonzero_slots(layer) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every nonzero of the CSR (on the CPU): its group, its slot in the group, its flat column."""
    slot_rows = layer.tile_rows.to(torch.int64).cpu()
    slot_of = torch.full((layer.out_channels,), -1, dtype=torch.int64)
    live = slot_rows >= 0
    slot_of[slot_rows[live]] = torch.arange(slot_rows.numel())[live]
    full_slot = slot_of[layer.rows().cpu()]
    return full_slot // ROWS, full_slot % ROWS, layer.columns().cpu()


def _group_positions(layer) -> Tuple[torch.Tensor, torch.Tensor]:
    """(kptr int64 [groups+1], cols int64 [kptr[-1]]): every group's positions, from the layer's tiles."""
    kptr = layer.tile_kptr.to(torch.int64).cpu()
    tile_cols = unsigned(layer.tile_cols).cpu()
    groups = kptr.numel() - 1
    # Each (group, column): the bit set of the group's slots whose channel uses it.
    group, slot, cols = _nonzero_slots(layer)
    key = group * layer.row_length + cols
    bits = torch.zeros(groups * layer.row_length, dtype=torch.int64)
    bits.index_add_(0, key, torch.ones_like(key) << slot)
    bits = bits.view(groups, layer.row_length)
    out_ptr, out_cols = [0], []
    for g in range(groups):
        taps = torch.unique_consecutive(tile_cols[kptr[g] : kptr[g + 1]])  # ascending, padding repeats dropped
        used = bits[g, taps]
        taps = taps[used != 0]
        positions = chunk_taps(taps.tolist(), used[used != 0].tolist())
        out_cols.extend(positions)
        out_ptr.append(out_ptr[-1] + len(positions))
    return torch.tensor(out_ptr, dtype=torch.int64), torch.tensor(out_cols, dtype=torch.int64)


def mma_ratio(layer) -> float:
    """MMAs of the 2:4 stream over those of the dense-MMA stream (16 taps an m16n8k16, two a k-step)."""
    kptr, _ = _group_positions(layer)
    dense = int(layer.tile_kptr[-1])
    return (int(kptr[-1]) / PAIR_K) / (dense / 16) if dense else 1.0


def _element_places(layer, kptr: torch.Tensor, cols: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """For every nonzero of the CSR: its stream value index; and for every (step, lane): the metadata word."""
    group, slot, ccols = _nonzero_slots(layer)
    # Each nonzero's position: its column's first position in its group (padding repeats come later).
    groups = kptr.numel() - 1
    pos_group = torch.repeat_interleave(torch.arange(groups), kptr[1:] - kptr[:-1])
    first = torch.ones(cols.numel(), dtype=torch.bool)
    first[1:] = (cols[1:] != cols[:-1]) | (pos_group[1:] != pos_group[:-1])
    keys = pos_group[first] * layer.row_length + cols[first]  # ascending: groups in order, columns ascending
    where = torch.nonzero(first).flatten()
    pos = where[torch.searchsorted(keys, group * layer.row_length + ccols)]
    chunk = pos // CHUNK  # global chunk index
    p = pos % CHUNK
    # Rank of each nonzero among its row's nonzeros in its chunk (0 or 1): sort by (chunk, slot, p).
    order = torch.argsort((chunk * ROWS + slot) * CHUNK + p)
    cs = (chunk * ROWS + slot)[order]
    rank_sorted = torch.zeros_like(cs)
    rank_sorted[1:] = (cs[1:] == cs[:-1]).to(torch.int64)
    if bool((rank_sorted[1:] + rank_sorted[:-1] > 1).any()):
        raise RuntimeError("pairs: a row holds more than two nonzeros in one 2:4 chunk (a packing bug)")
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    # The pair of positions of each (chunk, slot) with nonzeros: two nonzeros give theirs; one at p gives
    # (p, p + 1), or (2, 3) for p = 3 (its value then second).
    n_chunks = cols.numel() // CHUNK
    cnt = torch.zeros(n_chunks * ROWS, dtype=torch.int64)
    cnt.index_add_(0, chunk * ROWS + slot, torch.ones_like(chunk))
    pmin = torch.full((n_chunks * ROWS,), CHUNK, dtype=torch.int64)
    pmin.scatter_reduce_(0, chunk * ROWS + slot, p, reduce="amin")
    pmax = torch.full((n_chunks * ROWS,), -1, dtype=torch.int64)
    pmax.scatter_reduce_(0, chunk * ROWS + slot, p, reduce="amax")
    # A row without nonzeros in a chunk: positions 0 and 1, both zero (0b0100).
    lo = torch.where(cnt == 2, pmin, torch.where(cnt == 1, torch.clamp(pmin, max=2), torch.zeros_like(pmin)))
    hi = torch.where(cnt == 2, pmax, lo + 1)
    nibble = lo | (hi << 2)
    e = torch.where(cnt[chunk * ROWS + slot] == 2, rank, (p != lo[chunk * ROWS + slot]).to(torch.int64))
    # Value index: step, lane (g, q), register r, half e.
    step, j = chunk // CHUNKS_PER_STEP, chunk % CHUNKS_PER_STEP
    g, hi_row = slot % 8, slot // 8
    lane = 4 * g + j % 4
    r = 2 * (j // 4) + hi_row
    value_index = (step * 32 + lane) * 8 + 2 * r + e
    # Metadata words: (step, lane 4g + h) gets chunk 4h + i of row g at bits 4i, of row g + 8 at 16 + 4i.
    c_all = torch.arange(n_chunks).repeat_interleave(ROWS)
    s_all = torch.arange(ROWS).repeat(n_chunks)
    st, jj = c_all // CHUNKS_PER_STEP, c_all % CHUNKS_PER_STEP
    word = st * 32 + 4 * (s_all % 8) + jj // 4
    shift = 16 * (s_all // 8) + 4 * (jj % 4)
    meta = torch.zeros(n_chunks // CHUNKS_PER_STEP * 32, dtype=torch.int64)
    meta.index_add_(0, word, nibble << shift)
    return value_index, meta


def pair_stream(layer, dtype: torch.dtype):
    """Build the 2:4 stream of ``layer`` (on its device) for activations of ``dtype`` (see the module doc).

    Value kinds as ``tiles.fragment_stream``: linear codes stay codes (every empty place is its row's zero
    point), codebook codes where an exact zero exists or fits, anything else values in ``dtype``."""
    if layer.tile_kptr is None:
        raise ValueError("layer: has no tensor-core tiles (pack it with format version 2, or build_tiles)")
    dev = layer.rowptr.device
    kptr, cols = _group_positions(layer)
    value_index, meta = _element_places(layer, kptr, cols)
    steps = cols.numel() // PAIR_K
    total = steps * 32 * 8
    kind = stream_kind(layer)
    common = dict(taps=tap_codes_of(cols, layer).to(dev), kptr=kptr.to(torch.int32).to(dev), pairs=True, dtype=dtype)
    if kind != TC_HALF:
        book, stream = zero_filled_codes(layer, kptr, PAIR_K, _place_slot())
        stream[value_index] = layer.codes().cpu()
        values = pack_codes(stream, layer.bits)
        return FragmentStream(kind, _with_metadata(values, meta, steps).to(dev), book, **common)
    values = torch.zeros(total, dtype=torch.float32)
    values[value_index] = layer.nonzero_values().cpu().to(torch.float32)
    values = values.to(dtype).view(torch.uint8)
    return FragmentStream(TC_HALF, _with_metadata(values, meta, steps).to(dev), **common)


def _place_slot() -> torch.Tensor:
    """[32 * 8]: the group slot (row of A) of each (lane, value) place of a k-step: value v of lane l holds
    row l // 4 + 8 * (register v // 2 odd)."""
    lane = torch.arange(32).view(-1, 1)
    v = torch.arange(8).view(1, -1)
    return (lane // 4 + 8 * ((v // 2) % 2)).reshape(-1)


def _with_metadata(values: torch.Tensor, meta: torch.Tensor, steps: int) -> torch.Tensor:
    """The stream's bytes: each k-step's values (32 lanes'), then its 32 metadata words (little-endian)."""
    if steps == 0:  # a layer without nonzeros: no k-step
        return torch.zeros(0, dtype=torch.uint8)
    words = torch.where(meta >= 1 << 31, meta - (1 << 32), meta).to(torch.int32).view(torch.uint8)
    return torch.cat([values.view(steps, -1), words.view(steps, 128)], dim=1).reshape(-1).contiguous()


def split_pair_stream(stream) -> Tuple[torch.Tensor, torch.Tensor]:
    """(values: the k-steps' value bytes, [steps, 32 * lane bytes] uint8; metadata words int64 [steps * 32])."""
    steps = stream.taps.numel() // PAIR_K
    if steps == 0:
        return torch.zeros(0, 0, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    raw = stream.values.cpu().view(steps, -1)
    meta = raw[:, -128:].contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return raw[:, :-128].contiguous(), meta.reshape(-1)


def pair_stream_to_dense(layer, stream) -> torch.Tensor:
    """Decode a 2:4 stream to the dense [CO, K] fp32 weight as the sparse MMA reads it (for tests): each
    lane's value 2r + e lands at the position its metadata nibble names."""
    steps = stream.taps.numel() // PAIR_K
    n = steps * 32 * 8
    raw, meta = split_pair_stream(stream)
    if stream.kind == TC_HALF:
        entries = raw.reshape(-1).view(stream.dtype).to(torch.float32)
    else:
        entries = unpack_codes(raw.reshape(-1), layer.bits, n)
    step = torch.arange(steps).repeat_interleave(256)
    lane = torch.arange(32).repeat_interleave(8).repeat(steps)
    v = torch.arange(8).repeat(32 * steps)
    g, q, r, e = lane // 4, lane % 4, v // 2, v % 2
    row_slot = g + 8 * (r % 2)
    chunk = q + 4 * (r // 2)
    word = meta[step * 32 + 4 * g + chunk // 4]
    nibble = (word >> (16 * (r % 2) + 4 * (chunk % 4))) & 0xF
    position = torch.where(e == 0, nibble & 3, nibble >> 2)
    kptr = stream.kptr.to(torch.int64).cpu()
    group = torch.searchsorted(kptr, step * PAIR_K, right=True) - 1
    ch = layer.tile_rows.to(torch.int64).cpu()[group * ROWS + row_slot]
    col = tap_columns(stream.taps.cpu(), layer)[step * PAIR_K + CHUNK * chunk + position]
    return places_to_dense(layer, stream, ch, col, entries)
