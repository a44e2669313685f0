"""Tensor-core tiles of a packed layer: its output channels in groups of 16, each group's condensed taps.

The tensor-core kernels (``cuda/conv_tensor.cuh``) compute a group of ``TILE_ROWS`` output channels as
dense MMAs over the group's *condensed taps*: the flat columns ``(c_in*KH + kh)*KW + kw`` that any of
its channels uses, so a column no channel of the group needs costs nothing. Three tensors describe
them (stored in the packed file since format version 2, built on load for older files):

- ``tile_rows`` int32 [groups*16]: the output channel of each slot, -1 where the last group is short.
  Channels with similar masks share a group (``group_channels``), so the groups' tap lists are short.
- ``tile_kptr`` int32 [groups+1]: where each group's taps start; every count a multiple of 16 (the MMA's K).
- ``tile_cols`` [tile_kptr[-1]]: the taps, ascending within a group, padded by repeating the last tap
  (its weights are zero); int16 read as unsigned 16 bits like ``colidx``, or int32. The kernels read
  them as tap codes (``tap_codes``), which split without a division.

The weights the kernels read are derived from these and the CSR values at run time (``fragment_stream``):
each k-step's 16 taps x 16 channels in the lane order of the MMA's B fragment, as values in the
activation dtype, or as the layer's codes (decoded in the kernel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from sparsebench.sparse.codes import INDEX16_LIMIT, pack_codes, unpack_codes, unsigned

TILE_ROWS = 16  # output channels per group: two m16n8k16 MMAs wide
TILE_K = 16  # taps per k-step: the MMA's K
# Greedy grouping by mask similarity costs about CO * CO * K / 16 multiply-adds; above this it
# groups by row length instead (still correct, only less condensed).
SIMILARITY_BUDGET = 4e10


def group_channels(mask: torch.Tensor, by_similarity: bool = True) -> torch.Tensor:
    """Order the output channels into groups of TILE_ROWS: int64 [groups*16], -1 padding the last.

    ``mask`` [CO, K] (bool) holds each channel's nonzero columns. Greedy: a group starts from the
    longest channel left and adds, one at a time, the channel that adds the fewest new columns to
    the group's union (ties: the longer channel). Without ``by_similarity`` (or past the budget)
    channels go in order of their length, longest first."""
    co, k = mask.shape
    groups = -(-co // TILE_ROWS)
    lengths = mask.sum(dim=1)
    order = torch.argsort(lengths, descending=True, stable=True)
    out = torch.full((groups * TILE_ROWS,), -1, dtype=torch.int64)
    if not by_similarity or co <= 1 or float(co) * co * k / TILE_ROWS > SIMILARITY_BUDGET:
        out[:co] = order
        return out
    m = mask.to(torch.float32)
    left = torch.ones(co, dtype=torch.bool)
    length = lengths.to(torch.float32)
    slot = 0
    for _ in range(groups):
        seed = int(order[left[order]][0])
        members = [seed]
        left[seed] = False
        union = m[seed].clone()
        for _ in range(TILE_ROWS - 1):
            if not bool(left.any()):
                break
            # New columns each candidate would add; the longest wins a tie (it uses the union best).
            added = length - m @ union
            score = added * (k + 1) - length
            score[~left] = float("inf")
            pick = int(torch.argmin(score))
            members.append(pick)
            left[pick] = False
            union = torch.maximum(union, m[pick])
        out[slot : slot + len(members)] = torch.tensor(members)
        slot += TILE_ROWS
    return out


def condensed_taps(mask: torch.Tensor, tile_rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each group's taps: (kptr int64 [groups+1], cols int64 [kptr[-1]]), padded to multiples of TILE_K."""
    k = mask.shape[1]
    groups = tile_rows.numel() // TILE_ROWS
    slots = tile_rows.reshape(groups, TILE_ROWS)
    used = torch.zeros(groups, k, dtype=torch.bool)
    for s in range(TILE_ROWS):
        live = slots[:, s] >= 0
        used[live] |= mask[slots[live, s]]
    counts = used.sum(dim=1)
    padded = (counts + TILE_K - 1) // TILE_K * TILE_K
    kptr = torch.zeros(groups + 1, dtype=torch.int64)
    kptr[1:] = torch.cumsum(padded, 0)
    cols = torch.zeros(int(kptr[-1]), dtype=torch.int64)
    g_idx, c_idx = used.nonzero(as_tuple=True)  # row-major: ascending columns within each group
    first = torch.zeros(groups + 1, dtype=torch.int64)
    first[1:] = torch.cumsum(counts, 0)
    rank = torch.arange(g_idx.numel()) - first[g_idx]
    cols[kptr[g_idx] + rank] = c_idx
    # Padding repeats each group's last tap, so the taps stay sorted and the kernels read a staged column.
    for g in torch.nonzero(padded > counts).flatten().tolist():
        a, n, end = int(kptr[g]), int(counts[g]), int(kptr[g + 1])
        cols[a + n : end] = cols[a + n - 1]
    return kptr, cols


def build_tiles(mask: torch.Tensor, by_similarity: bool = True):
    """(tile_rows int32, tile_kptr int32, tile_cols int64) for a [CO, K] nonzero mask."""
    rows = group_channels(mask, by_similarity)
    kptr, cols = condensed_taps(mask, rows)
    return rows.to(torch.int32), kptr.to(torch.int32), cols


# ---------------------------------------------------------------------------------------------
# the weight stream in MMA fragment order

TC_HALF, TC_LINEAR, TC_CODEBOOK = 0, 1, 2


def _lane_order() -> Tuple[torch.Tensor, torch.Tensor]:
    """For position (tap t of the k-step, slot s of the group): the lane and value index holding it.

    Lane l (g = l // 4, q = l % 4) holds, for n-tile j, taps 2q, 2q+1, 2q+8, 2q+9 of slot 8j + g:
    value v = 4j + 2h + e is tap 2q + 8h + e."""
    t = torch.arange(TILE_K).view(-1, 1)
    s = torch.arange(TILE_ROWS).view(1, -1)
    q, e, h = (t % 8) // 2, t % 2, t // 8
    j, g = s // 8, s % 8
    return (g * 4 + q).expand(TILE_K, TILE_ROWS), (4 * j + 2 * h + e).expand(TILE_K, TILE_ROWS)


@dataclass
class FragmentStream:
    """The tensor-core kernels' weights for one layer and activation dtype (kept on the layer's device)."""

    kind: int  # TC_HALF | TC_LINEAR | TC_CODEBOOK
    values: torch.Tensor  # [steps * 32 * 8] dtype values, or [steps * 32 * bits] uint8 codes
    codebook: Optional[torch.Tensor] = None  # TC_CODEBOOK: levels with a zero, [levels] or [CO, levels]
    taps: Optional[torch.Tensor] = None  # the group's taps as tap codes (tap_codes), what the kernels read
    kptr: Optional[torch.Tensor] = None  # int32 [groups+1]: each group's first tap in ``taps``
    # The 2:4 stream (sparsebench.sparse.pairs): the groups each k-step of 32 taps serves (1, 2 or 4; 0 for
    # the dense-MMA stream); its own taps and pointers; values are bytes, each k-step's values then its
    # metadata words.
    pairs: int = 0
    dtype: Optional[torch.dtype] = None  # the activation dtype it was built for

    @property
    def codebook_stride(self) -> int:
        return self.codebook.shape[-1] if self.codebook is not None and self.codebook.dim() == 2 else 0

    def nbytes(self) -> int:
        parts = (self.values, self.codebook, self.taps, self.kptr)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def _positions(layer) -> Tuple[torch.Tensor, torch.Tensor]:
    """For every nonzero of the CSR: its group and its element index in the fragment stream."""
    dev = layer.rowptr.device
    rows = layer.rows()
    cols = layer.columns()
    tile_rows = layer.tile_rows.to(torch.int64)
    live = tile_rows >= 0
    group_of = torch.empty(layer.out_channels, dtype=torch.int64, device=dev)
    slot_of = torch.empty(layer.out_channels, dtype=torch.int64, device=dev)
    idx = torch.arange(tile_rows.numel(), device=dev)
    group_of[tile_rows[live]] = idx[live] // TILE_ROWS
    slot_of[tile_rows[live]] = idx[live] % TILE_ROWS
    g, s = group_of[rows], slot_of[rows]
    kptr = layer.tile_kptr.to(torch.int64)
    tcols = unsigned(layer.tile_cols)
    groups = kptr.numel() - 1
    key_tiles = (
        torch.repeat_interleave(torch.arange(groups, device=dev), kptr[1:] - kptr[:-1]) * layer.row_length + tcols
    )
    pos = torch.searchsorted(key_tiles, g * layer.row_length + cols)  # the first of any padding repeats
    local = pos - kptr[g]
    step, tap = kptr[g] // TILE_K + local // TILE_K, local % TILE_K
    lane_of, value_of = _lane_order()
    lane_of, value_of = lane_of.to(dev), value_of.to(dev)
    return g, (step * 32 + lane_of[tap, s]) * 8 + value_of[tap, s]


def _zero_code_book(layer) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """A codebook with an exact zero level for the stream, and the code of zero per channel; None if none fits."""
    book = layer.codebook
    levels = book.shape[-1]
    if levels < (1 << layer.bits):  # room for one more level: zero, at code `levels`
        zero = torch.zeros(book.shape[:-1] + (1,), dtype=book.dtype, device=book.device)
        return torch.cat([book, zero], dim=-1).contiguous(), torch.full(
            (layer.out_channels,), levels, dtype=torch.int64, device=book.device
        )
    is_zero = book == 0
    if book.dim() == 1:
        if not bool(is_zero.any()):
            return None
        return book.contiguous(), torch.full(
            (layer.out_channels,), int(is_zero.nonzero()[0]), dtype=torch.int64, device=book.device
        )
    if not bool(is_zero.any(dim=1).all()):
        return None
    return book.contiguous(), is_zero.to(torch.int8).argmax(dim=1).to(torch.int64)


def zero_codes(layer) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """For a stream of codes (``stream_kind`` not TC_HALF): (codebook or None, each channel's code of zero)."""
    if layer.value_kind == "linear":
        return None, layer.zero_point.to(torch.int64)
    return _zero_code_book(layer)


def stream_kind(layer) -> int:
    """The kind of stream ``fragment_stream`` builds for the layer (without building it)."""
    if layer.value_kind == "linear":
        zp = layer.zero_point
        return TC_LINEAR if bool(((zp >= 0) & (zp < (1 << layer.bits))).all()) else TC_HALF
    if layer.value_kind == "codebook":
        return TC_CODEBOOK if _zero_code_book(layer) is not None else TC_HALF
    return TC_HALF


def tap_bits(kernel_size: Tuple[int, int]) -> int:
    """Bits of kh and of kw in a tap code: enough for the larger kernel side, none for a 1x1 kernel."""
    return (max(kernel_size) - 1).bit_length()


def tap_code_dtype(layer) -> torch.dtype:
    """int16 (read as unsigned) where the largest tap code fits 16 bits, else int32."""
    limit = layer.in_channels << (2 * tap_bits(layer.kernel_size))
    return torch.int16 if limit <= INDEX16_LIMIT else torch.int32


def tap_codes(layer) -> torch.Tensor:
    """``tile_cols`` as the kernels read them: each flat column ``(ci*KH + kh)*KW + kw`` as
    ``ci << 2b | kh << b | kw`` (b = ``tap_bits``), so a kernel splits a tap with shifts and masks instead
    of two divisions. Codes ascend as the columns do, so a group's taps stay sorted; in
    ``tap_code_dtype`` and on the layer's device."""
    return tap_codes_of(unsigned(layer.tile_cols), layer)


def tap_codes_of(cols: torch.Tensor, layer) -> torch.Tensor:
    """Flat columns (int64) of ``layer`` as tap codes in ``tap_code_dtype``, on the columns' device."""
    kh_n, kw_n = layer.kernel_size
    b = tap_bits(layer.kernel_size)
    ci, rem = cols // (kh_n * kw_n), cols % (kh_n * kw_n)
    codes = (ci << (2 * b)) | ((rem // kw_n) << b) | (rem % kw_n)
    return codes.to(torch.int32).to(tap_code_dtype(layer))  # int16 wraps past 32767: read as unsigned


def tap_columns(codes: torch.Tensor, layer) -> torch.Tensor:
    """Tap codes (as stored: int16 read as unsigned) back to flat columns ``(ci*KH + kh)*KW + kw`` (int64)."""
    kh_n, kw_n = layer.kernel_size
    b = tap_bits(layer.kernel_size)
    c = unsigned(codes)
    return ((c >> (2 * b)) * kh_n + ((c >> b) & ((1 << b) - 1))) * kw_n + (c & ((1 << b) - 1))


def zero_filled_codes(
    layer,
    kptr: torch.Tensor,
    step_taps: int,
    place_slot: torch.Tensor,
    rows: Optional[torch.Tensor] = None,
    groups: int = 1,
):
    """(codebook or None, a code stream): the stream int64, one code a place, 256 G places a k-step that serves
    G = ``groups`` groups, every place at its channel's code of zero (``zero_codes``; a padding slot's: 0), for
    the caller to fill. ``kptr``: each G-group's first tap (k-steps of ``step_taps``); ``place_slot`` [256 G]: the
    slot of each place among the G-group's 16 G; ``rows``: the slots' channels (default the layer's
    ``tile_rows``), at least 16 G a G-group."""
    dev = place_slot.device
    kptr = kptr.to(torch.int64).to(dev)
    steps = (kptr[1:] - kptr[:-1]) // step_taps
    step_group = torch.repeat_interleave(torch.arange(steps.numel(), device=dev), steps)
    rows = (layer.tile_rows if rows is None else rows).to(torch.int64).to(dev)
    ch = rows[step_group.view(-1, 1) * (TILE_ROWS * groups) + place_slot.view(1, -1)]
    book, zero_code = zero_codes(layer)
    zero_code = zero_code.to(dev)
    return book, torch.where(ch >= 0, zero_code[ch.clamp_min(0)], torch.zeros_like(ch)).reshape(-1)


def places_to_dense(layer, stream: "FragmentStream", ch: torch.Tensor, col: torch.Tensor, raw: torch.Tensor):
    """The dense [CO, K] fp32 weight from a stream's places: each place's channel (-1: padding), column and
    raw entry (a value for TC_HALF, else a code), decoded as the kernels decode it (for tests)."""
    c = ch.clamp_min(0)
    if stream.kind == TC_LINEAR:
        vals = layer.scale.to(raw.device)[c] * (raw - layer.zero_point.to(raw.device)[c].to(torch.int64)).float()
    elif stream.kind == TC_CODEBOOK:
        book = stream.codebook.to(raw.device)
        vals = book[c, raw] if book.dim() == 2 else book[raw]
    else:
        vals = raw
    dense = torch.zeros(layer.out_channels, layer.row_length, dtype=torch.float32, device=raw.device)
    live = ch >= 0
    # Padding taps repeat a real tap with zero weight: add, so a repeat never overwrites the real weight.
    dense.index_put_((ch[live], col[live]), vals[live].to(torch.float32), accumulate=True)
    return dense


def fragment_stream(layer, dtype: torch.dtype) -> FragmentStream:
    """Build the tensor-core weight stream of ``layer`` (on its device) for activations of ``dtype``.

    Linear codes stay codes (zeros are the zero point; the kernel scales the sum); codebook codes
    stay codes where a code of an exact zero exists or fits; anything else becomes values in ``dtype``."""
    if layer.tile_kptr is None:
        raise ValueError("layer: has no tensor-core tiles (pack it with format version 2, or build_tiles)")
    dev = layer.rowptr.device
    steps = int(layer.tile_kptr[-1]) // TILE_K
    _, elem = _positions(layer)
    total = steps * 32 * 8
    kind = stream_kind(layer)
    common = dict(taps=tap_codes(layer), kptr=layer.tile_kptr)
    if kind != TC_HALF:
        book, stream = zero_filled_codes(layer, layer.tile_kptr, TILE_K, _slot_of_lane_value().to(dev))
        stream[elem] = layer.codes()
        return FragmentStream(kind, pack_codes(stream, layer.bits).to(dev), book, **common)
    values = torch.zeros(total, dtype=torch.float32, device=dev)
    values[elem] = layer.nonzero_values()
    return FragmentStream(TC_HALF, values.to(dtype), **common)


def _slot_of_lane_value() -> torch.Tensor:
    """[32 * 8]: the group slot (output channel) of each (lane, value) position of a k-step."""
    lane = torch.arange(32).view(-1, 1)
    v = torch.arange(8).view(1, -1)
    return ((v // 4) * 8 + lane // 4).reshape(-1)


def stream_to_dense(layer, stream: FragmentStream) -> torch.Tensor:
    """Decode a stream back to the dense [CO, K] fp32 weight (the kernels' view of it; for tests)."""
    dev = stream.values.device
    steps = int(layer.tile_kptr[-1]) // TILE_K
    n = steps * 32 * 8
    raw = stream.values.to(torch.float32) if stream.kind == TC_HALF else unpack_codes(stream.values, layer.bits, n)
    slot = _slot_of_lane_value().to(dev).repeat(steps)
    tap_in_step = _tap_of_lane_value().to(dev).repeat(steps)
    step = torch.arange(steps, device=dev).repeat_interleave(256)
    kptr = layer.tile_kptr.to(torch.int64).to(dev)
    group = torch.searchsorted(kptr, step * TILE_K, right=True) - 1
    ch = layer.tile_rows.to(torch.int64).to(dev)[group * TILE_ROWS + slot]
    col = unsigned(layer.tile_cols).to(dev)[step * TILE_K + tap_in_step]
    return places_to_dense(layer, stream, ch, col, raw)


def _tap_of_lane_value() -> torch.Tensor:
    """[32 * 8]: the tap (of the k-step's 16) of each (lane, value) position."""
    lane = torch.arange(32).view(-1, 1)
    v = torch.arange(8).view(1, -1)
    q, h, e = lane % 4, (v % 4) // 2, v % 2
    return (2 * q + 8 * h + e).reshape(-1)
