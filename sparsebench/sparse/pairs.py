"""The 2:4 weight stream: a group's condensed taps packed so that the sparse tensor cores can skip half.

``mma.sp.m16n8k32`` multiplies a 16 x 32 A that holds at most two nonzeros in each row's four-column
chunk, stored compressed (16 x 16) with 2-bit indices, at the cost of a dense m16n8k16: twice the
work per MMA. Here A is a group's 16 output channels x 32 of its condensed taps. A 90%-sparse group
uses 78% of the taps but each channel only 13% of them, so four consecutive taps almost never hold
three nonzeros of one channel: ``chunk_taps`` walks the group's taps in ascending order and closes a
chunk early where one would (the rest of the chunk repeats its last tap with zero weights). The taps
stay ascending, so the kernels' chunking of the staged input works unchanged, and a layer needs about
0.52x the MMAs of the dense-MMA stream at 90% (``mma_ratio``).

A k-step may serve G groups at once (``groups``: 1, 2 or 4; a warp then multiplies each pixel tile it loads
by G groups' weights, which divides the loads of staged input per MMA by G). The G consecutive groups of
the tiles then share one tap list, the union of theirs, chunked so that none of their 16G channels holds a
third nonzero in a chunk: more MMAs (about 1.2x for G = 2, 1.3x for G = 4 at 90%) for fewer loads of
the pixels (1.7x and 3.1x fewer; ``load_ratio``).

The stream (``pair_stream``) is a ``FragmentStream`` with ``pairs=G``: every k-step (32 taps) is, for each
of its G groups, 32 lanes' 8 values (or codes) in the order of the A fragment, then for each group 32
lanes' metadata words. It carries its own ``kptr`` (each G-group's first tap, multiples of 32) and ``taps``
(tap codes); G-group s is groups sG .. sG + G - 1 of the tiles (the last may have fewer). For one group, lane l
(g = l // 4, q = l % 4) holds register r = 2 * (chunk // 4) + (row >= 8) for row g or g + 8 and chunk
q or q + 4; value 2r + e is at the e-th position its metadata names (a lone nonzero at position 3 is
stored second, a zero at position 2 first). Lane 4g + h (h = 0, 1) holds the
metadata of chunks 4h..4h+3 of rows g (bits 0-15) and g + 8 (bits 16-31), a nibble a chunk: the two
positions (first in the low bits, ascending), as ``mma.sp::ordered_metadata`` reads them.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

from sparsebench.sparse.codes import pack_codes, unpack_codes
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
GROUPS = (1, 2, 4)  # groups a k-step may serve


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


def _check_groups(groups: int) -> None:
    if groups not in GROUPS:
        raise ValueError(f"groups: expected one of {GROUPS} (groups a 2:4 k-step serves), got {groups!r}")


def _padded_rows(layer, groups: int) -> torch.Tensor:
    """The tiles' slot channels (int32, on the layer's device), -1 up to a multiple of 16 * ``groups`` slots."""
    rows = layer.tile_rows
    pad = -rows.numel() % (ROWS * groups)
    return torch.cat([rows, rows.new_full((pad,), -1)]) if pad else rows


def _nonzero_slots(layer, groups: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every nonzero of the CSR (on the CPU): its G-group, its slot in it (0 .. 16G - 1), its flat column."""
    slot_rows = layer.tile_rows.to(torch.int64).cpu()
    slot_of = torch.full((layer.out_channels,), -1, dtype=torch.int64)
    live = slot_rows >= 0
    slot_of[slot_rows[live]] = torch.arange(slot_rows.numel())[live]
    full_slot = slot_of[layer.rows().cpu()]
    rows = ROWS * groups
    return full_slot // rows, full_slot % rows, layer.columns().cpu()


def _group_positions(layer, groups: int, slots=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(kptr int64 [G-groups + 1], cols int64 [kptr[-1]]): every G-group's positions: the columns any of its
    channels uses, ascending, chunked. ``slots``: ``_nonzero_slots(layer, groups)`` if the caller has it."""
    supers = -(-(layer.tile_kptr.numel() - 1) // groups)
    # Each (G-group, column): the bit set of its slots whose channel uses it. Slot 63 sets the sign bit:
    # each bit is added once, so the sum is the bit set all the same, and Python's & and | read it as such.
    sup, slot, cols = slots if slots is not None else _nonzero_slots(layer, groups)
    bits = torch.zeros(supers * layer.row_length, dtype=torch.int64)
    bits.index_add_(0, sup * layer.row_length + cols, torch.ones_like(cols) << slot)
    bits = bits.view(supers, layer.row_length)
    out_ptr, out_cols = [0], []
    for s in range(supers):
        taps = torch.nonzero(bits[s]).flatten()
        positions = chunk_taps(taps.tolist(), bits[s, taps].tolist())
        out_cols.extend(positions)
        out_ptr.append(out_ptr[-1] + len(positions))
    return torch.tensor(out_ptr, dtype=torch.int64), torch.tensor(out_cols, dtype=torch.int64)


def mma_ratio(layer, groups: int = 1) -> float:
    """MMAs of the 2:4 stream over those of the dense-MMA stream: per 16 pixels, G sparse MMAs a 32-tap k-step
    against two dense ones a 16-tap k-step, so ``load_ratio`` x G / 2."""
    _check_groups(groups)
    return load_ratio(layer, groups) * groups / 2 if int(layer.tile_kptr[-1]) else 1.0


def load_ratio(layer, groups: int = 1) -> float:
    """Loads of staged pixels (ldmatrix.x4, 512 bytes) of the 2:4 stream over those of the dense-MMA stream:
    16 taps x 16 pixels a load in the dense one, 32 taps x 8 pixels in the 2:4 one, once for its G groups."""
    _check_groups(groups)
    kptr, _ = _group_positions(layer, groups)
    dense = int(layer.tile_kptr[-1])
    return int(kptr[-1]) / dense if dense else 1.0


def _element_places(
    layer, kptr: torch.Tensor, cols: torch.Tensor, groups: int, slots
) -> Tuple[torch.Tensor, torch.Tensor]:
    """For every nonzero of the CSR: its stream value index; and for every (step, group, lane): the metadata
    word. ``slots``: ``_nonzero_slots(layer, groups)``."""
    rows = ROWS * groups
    sup, slot, ccols = slots
    # Each nonzero's position: its column's first position in its G-group (padding repeats come later).
    supers = kptr.numel() - 1
    pos_super = torch.repeat_interleave(torch.arange(supers), kptr[1:] - kptr[:-1])
    first = torch.ones(cols.numel(), dtype=torch.bool)
    first[1:] = (cols[1:] != cols[:-1]) | (pos_super[1:] != pos_super[:-1])
    keys = pos_super[first] * layer.row_length + cols[first]  # ascending: G-groups in order, columns ascending
    where = torch.nonzero(first).flatten()
    pos = where[torch.searchsorted(keys, sup * layer.row_length + ccols)]
    chunk = pos // CHUNK  # global chunk index
    p = pos % CHUNK
    # Rank of each nonzero among its row's nonzeros in its chunk (0 or 1): sort by (chunk, slot, p).
    row_chunk = chunk * rows + slot
    order = torch.argsort(row_chunk * CHUNK + p)
    cs = row_chunk[order]
    rank_sorted = torch.zeros_like(cs)
    rank_sorted[1:] = (cs[1:] == cs[:-1]).to(torch.int64)
    if bool((rank_sorted[1:] + rank_sorted[:-1] > 1).any()):
        raise RuntimeError("pairs: a row holds more than two nonzeros in one 2:4 chunk (a packing bug)")
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    # The pair of positions of each (chunk, slot) with nonzeros: two nonzeros give theirs; one at p gives
    # (p, p + 1), or (2, 3) for p = 3 (its value then second).
    n_chunks = cols.numel() // CHUNK
    cnt = torch.zeros(n_chunks * rows, dtype=torch.int64)
    cnt.index_add_(0, row_chunk, torch.ones_like(chunk))
    pmin = torch.full((n_chunks * rows,), CHUNK, dtype=torch.int64)
    pmin.scatter_reduce_(0, row_chunk, p, reduce="amin")
    pmax = torch.full((n_chunks * rows,), -1, dtype=torch.int64)
    pmax.scatter_reduce_(0, row_chunk, p, reduce="amax")
    # A row without nonzeros in a chunk: positions 0 and 1, both zero (0b0100).
    lo = torch.where(cnt == 2, pmin, torch.where(cnt == 1, torch.clamp(pmin, max=2), torch.zeros_like(pmin)))
    hi = torch.where(cnt == 2, pmax, lo + 1)
    nibble = lo | (hi << 2)
    e = torch.where(cnt[row_chunk] == 2, rank, (p != lo[row_chunk]).to(torch.int64))
    # Value index: step, group of the step, lane (g, q), register r, half e.
    step, j = chunk // CHUNKS_PER_STEP, chunk % CHUNKS_PER_STEP
    part, g, hi_row = slot // ROWS, slot % 8, (slot % ROWS) // 8
    lane = 4 * g + j % 4
    r = 2 * (j // 4) + hi_row
    value_index = ((step * groups + part) * 32 + lane) * 8 + 2 * r + e
    # Metadata words: (step, group, lane 4g + h) gets chunk 4h + i of row g at bits 4i, of row g + 8 at 16 + 4i.
    c_all = torch.arange(n_chunks).repeat_interleave(rows)
    s_all = torch.arange(rows).repeat(n_chunks)
    st, jj = c_all // CHUNKS_PER_STEP, c_all % CHUNKS_PER_STEP
    word = (st * groups + s_all // ROWS) * 32 + 4 * (s_all % 8) + jj // 4
    shift = 16 * ((s_all % ROWS) // 8) + 4 * (jj % 4)
    meta = torch.zeros(n_chunks // CHUNKS_PER_STEP * groups * 32, dtype=torch.int64)
    meta.index_add_(0, word, nibble << shift)
    return value_index, meta


def pair_stream(layer, dtype: torch.dtype, groups: int = 1):
    """Build the 2:4 stream of ``layer`` (on its device) for activations of ``dtype``, each k-step serving
    ``groups`` consecutive groups of its tiles (see the module doc).

    Value kinds as ``tiles.fragment_stream``: linear codes stay codes (every empty place is its row's zero
    point), codebook codes where an exact zero exists or fits, anything else values in ``dtype``."""
    if layer.tile_kptr is None:
        raise ValueError("layer: has no tensor-core tiles (pack it with format version 2, or build_tiles)")
    _check_groups(groups)
    dev = layer.rowptr.device
    slots = _nonzero_slots(layer, groups)
    kptr, cols = _group_positions(layer, groups, slots)
    value_index, meta = _element_places(layer, kptr, cols, groups, slots)
    steps = cols.numel() // PAIR_K
    kind = stream_kind(layer)
    common = dict(taps=tap_codes_of(cols, layer).to(dev), kptr=kptr.to(torch.int32).to(dev), pairs=groups, dtype=dtype)
    if kind != TC_HALF:
        book, stream = zero_filled_codes(layer, kptr, PAIR_K, _place_slot(groups), _padded_rows(layer, groups), groups)
        stream[value_index] = layer.codes().cpu()
        values = pack_codes(stream, layer.bits)
        return FragmentStream(kind, _with_metadata(values, meta, steps).to(dev), book, **common)
    values = torch.zeros(steps * groups * 32 * 8, dtype=torch.float32)
    values[value_index] = layer.nonzero_values().cpu().to(torch.float32)
    values = values.to(dtype).view(torch.uint8)
    return FragmentStream(TC_HALF, _with_metadata(values, meta, steps).to(dev), **common)


def _place_slot(groups: int) -> torch.Tensor:
    """[G * 32 * 8]: the slot (of the G-group's 16G) of each (group, lane, value) place of a k-step: value v of
    lane l holds row l // 4 + 8 * (register v // 2 odd) of its group."""
    part = torch.arange(groups).view(-1, 1, 1)
    lane = torch.arange(32).view(1, -1, 1)
    v = torch.arange(8).view(1, 1, -1)
    return (ROWS * part + lane // 4 + 8 * ((v // 2) % 2)).reshape(-1)


def _with_metadata(values: torch.Tensor, meta: torch.Tensor, steps: int) -> torch.Tensor:
    """The stream's bytes: each k-step's values (G groups of 32 lanes'), then its G x 32 metadata words
    (little-endian)."""
    if steps == 0:  # a layer without nonzeros: no k-step
        return torch.zeros(0, dtype=torch.uint8)
    words = torch.where(meta >= 1 << 31, meta - (1 << 32), meta).to(torch.int32).view(torch.uint8)
    return torch.cat([values.view(steps, -1), words.view(steps, -1)], dim=1).reshape(-1).contiguous()


def split_pair_stream(stream) -> Tuple[torch.Tensor, torch.Tensor]:
    """(values: the k-steps' value bytes, [steps, G * 32 * lane bytes] uint8; metadata words int64
    [steps * G * 32])."""
    steps = stream.taps.numel() // PAIR_K
    if steps == 0:
        return torch.zeros(0, 0, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    raw = stream.values.cpu().view(steps, -1)
    meta_bytes = 128 * stream.pairs
    meta = raw[:, -meta_bytes:].contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return raw[:, :-meta_bytes].contiguous(), meta.reshape(-1)


def pair_stream_to_dense(layer, stream) -> torch.Tensor:
    """Decode a 2:4 stream to the dense [CO, K] fp32 weight as the sparse MMA reads it (for tests): each
    lane's value 2r + e lands at the position its metadata nibble names."""
    groups = stream.pairs
    steps = stream.taps.numel() // PAIR_K
    places = steps * groups * 256
    raw, meta = split_pair_stream(stream)
    if stream.kind == TC_HALF:
        entries = raw.reshape(-1).view(stream.dtype).to(torch.float32)
    else:
        entries = unpack_codes(raw.reshape(-1), layer.bits, places)
    place = torch.arange(places)
    step, part, lane, v = place // (groups * 256), (place // 256) % groups, (place // 8) % 32, place % 8
    g, r, e = lane // 4, v // 2, v % 2
    chunk = lane % 4 + 4 * (r // 2)
    word = meta[(step * groups + part) * 32 + 4 * g + chunk // 4]
    nibble = (word >> (16 * (r % 2) + 4 * (chunk % 4))) & 0xF
    position = torch.where(e == 0, nibble & 3, nibble >> 2)
    kptr = stream.kptr.to(torch.int64).cpu()
    sup = torch.searchsorted(kptr, step * PAIR_K, right=True) - 1
    ch = _padded_rows(layer, groups).to(torch.int64).cpu()[(sup * groups + part) * ROWS + g + 8 * (r % 2)]
    col = tap_columns(stream.taps.cpu(), layer)[step * PAIR_K + CHUNK * chunk + position]
    return places_to_dense(layer, stream, ch, col, entries)
