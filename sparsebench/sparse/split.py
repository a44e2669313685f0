"""The split 2:4 stream: the weights of the implicit-GEMM tensor-core kernel (``cuda/conv_gemm.cu``).

That kernel computes every output channel over every tap, in (kh, kw, ci) order so that 8 consecutive taps
are 16 contiguous bytes of a channels_last pixel, with ``mma.sp.m16n8k32``: each row of a 16 x 32 weight
tile may hold two nonzeros in each chunk of four taps. An unstructured layer's chunk may hold more, so
each (group, k-step) tile is split in two 2:4 halves: a row's first two nonzeros in each chunk, then the
rest. The second half is mostly empty: a 16-channel tile of 32 taps has one with probability
1 - (1 - p3)^128, p3 the chance that a chunk of a row holds three nonzeros or four (38% at 90%
sparsity, 6% at 95%), and the kernel runs its MMAs only where a flag says it has a nonzero
(``mma_ratio``).

Layout (little-endian bytes, ``tile_steps`` = ceil(K / 32) k-steps, K = KH*KW*C): for every k-step, for each
of the tiles' groups (``tile_rows``; their count rounded up to 8 with empty ones), a record of 1,280 bytes:

- 512: the first half's values, lane l's 8 in the order of the A fragment (``pairs.py`` explains it);
- 512: the second half's values, the same way;
- 256: each lane's two metadata words (first half, second half), ``mma.sp::ordered_metadata`` nibbles as
  in ``pairs.py``. Lanes 2 and 3's first words, which the MMAs do not read, are flags: 1 where the second
  half has a nonzero (lane 2), and where that of any of the aligned four groups has (lane 3: a wgmma
  computes 64 channels, ``cuda/conv_wgmma.cu``).

Values are linear codes minus their zero point where the layer's codes are linear (exact small integers;
the kernel scales the channel's sum), else the values in the activation dtype (codebook levels included).
"""

from __future__ import annotations

import torch

from sparsebench.sparse.tiles import TC_HALF, TC_LINEAR, FragmentStream, stream_kind

SPLIT = 8  # the stream's tc_pairs (cuda/sparsebench.h: kTcSplit)
STEP_K = 32  # taps a k-step: the K of one mma.sp.m16n8k32
CHUNK = 4
ROWS = 16  # channels a group
GROUP_ALIGN = 8  # a k-step's groups are padded to a multiple of this (the kernel's widest block reads 8)
RECORD = 1280  # bytes of one group's k-step
FLAG_WORD = 4  # the flag's int32 index within a record's metadata (lane 2, first word)
FLAG4_WORD = 6  # the flag of the aligned four groups (lane 3, first word)
WARPGROUP = 4  # groups a wgmma computes


def gemm_entries(layer) -> tuple:
    """(entries fp32 [CO, KH*KW*C], present bool [CO, KH*KW*C], kind): the stream's value of every weight in (kh, kw,
    ci) order, whether the CSR stores it, and the stream kind (TC_LINEAR: code minus zero point; TC_HALF: value)."""
    co, c = layer.out_channels, layer.in_channels
    kh, kw = layer.kernel_size
    rows, cols = layer.rows().cpu(), layer.columns().cpu()
    kind = TC_LINEAR if stream_kind(layer) == TC_LINEAR else TC_HALF
    if kind == TC_LINEAR:
        values = (layer.codes().cpu() - layer.zero_point.cpu().to(torch.int64)[rows]).to(torch.float32)
    else:
        values = layer.nonzero_values().cpu().to(torch.float32)
    ci, rem = cols // (kh * kw), cols % (kh * kw)
    k = rem * c + ci  # (kh, kw) = divmod(rem, kw), so rem * C + ci is (kh * KW + kw) * C + ci
    entries = torch.zeros(co, kh * kw * c, dtype=torch.float32)
    present = torch.zeros(co, kh * kw * c, dtype=torch.bool)
    entries[rows, k] = values
    present[rows, k] = True
    return entries, present, kind


def _chunk_tables() -> tuple:
    """Lookup tables by a chunk's mask of nonzeros (bit p: position p holds one), 16 entries each:

    - the mask of the first half: the chunk's first two nonzeros (the second half holds the rest);
    - the (lo, hi) positions a half of that mask stores: two give their positions; one at p gives (p, p + 1),
      or (2, 3) for p = 3 with its value second; none gives (0, 1)."""
    first = torch.zeros(16, dtype=torch.int64)
    positions = torch.zeros(16, 2, dtype=torch.int64)
    for mask in range(16):
        kept = [p for p in range(CHUNK) if mask >> p & 1]
        first[mask] = sum(1 << p for p in kept[:2])
        if len(kept) <= 2:
            lo = kept[0] if len(kept) == 2 else min(kept[0], 2) if kept else 0
            positions[mask] = torch.tensor([lo, kept[-1] if len(kept) == 2 else lo + 1])
    return first, positions


_FIRST_TWO, _POSITIONS = _chunk_tables()


def _encode(values: torch.Tensor, mask: torch.Tensor) -> tuple:
    """One 2:4 half of [..., 4] chunks given its masks [...] (at most two bits each): (its two values a chunk
    [..., 2], its metadata nibble [...])."""
    positions = _POSITIONS[mask]  # [..., 2]
    stored = ((mask.unsqueeze(-1) >> positions) & 1).bool()  # a filler position stores (+) zero
    pair = torch.where(stored, values.gather(-1, positions), 0.0)
    return pair, positions[..., 0] | (positions[..., 1] << 2)


def _fragments(pair: torch.Tensor) -> torch.Tensor:
    """[groups, 16 rows, steps, 8 chunks, 2] values -> [steps, groups, 32 lanes, 8] in A-fragment order: lane 4g + q
    holds register r = 2 * (chunk // 4) + (row >= 8) for row g + 8 * (r % 2), chunk q + 4 * (r // 2)."""
    groups, _, steps = pair.shape[:3]
    v = pair.reshape(groups, 2, 8, steps, 2, 4, 2)  # group, row // 8, g, step, chunk // 4, q, e
    return v.permute(3, 0, 2, 5, 4, 1, 6).reshape(steps, groups, 32, 8)


def _metadata(nibble: torch.Tensor) -> torch.Tensor:
    """[groups, 16 rows, steps, 8 chunks] nibbles -> [steps, groups, 32 lanes] words: lane 4g + h (h = 0, 1) holds
    chunks 4h .. 4h + 3 of row g (bits 0-15) and row g + 8 (bits 16-31), lanes 4g + 2, 4g + 3 none."""
    groups, _, steps = nibble.shape[:3]
    n = nibble.reshape(groups, 2, 8, steps, 2, 4)  # group, row // 8, g, step, h, chunk % 4
    shift = 4 * torch.arange(4) + 16 * torch.arange(2).view(2, 1, 1, 1, 1)
    words = (n << shift.view(1, 2, 1, 1, 1, 4)).sum(dim=(1, 5))  # group, g, step, h
    lanes = torch.zeros(groups, 8, steps, 4, dtype=torch.int64)
    lanes[..., :2] = words
    return lanes.permute(2, 0, 1, 3).reshape(steps, groups, 32)


def split_tiles(layer) -> tuple:
    """The stream's parts on the CPU: (values fp32 [steps, groups, 2 halves, 32, 8], metadata int64 [steps,
    groups, 2, 32], second half has a nonzero bool [steps, groups], kind); groups padded to a multiple of 8."""
    entries, present, kind = gemm_entries(layer)
    slots = layer.tile_rows.to(torch.int64).cpu()
    groups = -(-slots.numel() // ROWS)
    padded = -(-groups // GROUP_ALIGN) * GROUP_ALIGN
    k = entries.shape[1]
    steps = -(-k // STEP_K)
    rows = torch.full((padded * ROWS,), -1, dtype=torch.int64)
    rows[: slots.numel()] = slots
    live = rows >= 0
    shape = (padded * ROWS, steps * STEP_K)
    e = torch.zeros(shape, dtype=torch.float32)
    m = torch.zeros(shape, dtype=torch.bool)
    e[live, :k] = entries[rows[live]]
    m[live, :k] = present[rows[live]]
    e = e.view(padded, ROWS, steps, 8, CHUNK)
    m = m.view(padded, ROWS, steps, 8, CHUNK)
    mask = (m.to(torch.int64) << torch.arange(CHUNK)).sum(dim=-1)  # [groups, 16, steps, 8]: a chunk's nonzeros
    first = _FIRST_TWO[mask]
    values, meta = [], []
    for half in (first, mask & ~first):
        pair, nibble = _encode(e, half)
        values.append(_fragments(pair))
        meta.append(_metadata(nibble))
    second = (mask != first).any(dim=3).any(dim=1).T.contiguous()  # [steps, groups]
    return torch.stack(values, dim=2), torch.stack(meta, dim=2), second, kind


def _flag4(second: torch.Tensor) -> torch.Tensor:
    """[steps, groups] second-half flags -> each group's flag of its aligned four (groups are padded to 8)."""
    return second.view(second.shape[0], -1, WARPGROUP).any(-1).repeat_interleave(WARPGROUP, dim=1)


def split_stream(layer, dtype: torch.dtype) -> FragmentStream:
    """Build the split stream of ``layer`` (on its device) for activations of ``dtype`` (see the module doc)."""
    if layer.tile_kptr is None:
        raise ValueError("layer: has no tensor-core tiles (pack it with format version 2, or build_tiles)")
    values, meta, second, kind = split_tiles(layer)
    steps, groups = second.shape
    value_bytes = values.to(dtype).view(torch.int16).view(steps, groups, 2 * 32 * 8)  # 1,024 bytes as 512 int16
    words = meta.permute(0, 1, 3, 2).reshape(steps, groups, 64)  # lane l's (first, second) at 2l, 2l + 1
    words[..., FLAG_WORD] = second.to(torch.int64)
    words[..., FLAG4_WORD] = _flag4(second).to(torch.int64)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    raw = torch.cat(
        [value_bytes.view(torch.uint8).reshape(steps, groups, -1), words.view(torch.uint8).view(steps, groups, -1)], -1
    )
    assert raw.shape[-1] == RECORD
    return FragmentStream(kind, raw.reshape(-1).contiguous().to(layer.rowptr.device), pairs=SPLIT, dtype=dtype)


def split_to_dense(layer, stream: FragmentStream, warpgroup: bool = False) -> torch.Tensor:
    """Decode a split stream to the dense [CO, KH*KW*C] fp32 entries (taps in (kh, kw, ci) order) as the kernel's
    MMAs read them, the second half only where its flag is set (``warpgroup``: the flag of four, as the wgmma
    kernel reads it) (for tests)."""
    raw = stream.values.cpu()
    groups_padded = -(-layer.tile_rows.numel() // ROWS)
    groups_padded = -(-groups_padded // GROUP_ALIGN) * GROUP_ALIGN
    steps = raw.numel() // (RECORD * groups_padded)
    rec = raw.view(steps, groups_padded, RECORD)
    vals = rec[..., :1024].contiguous().view(stream.dtype).to(torch.float32).view(steps, groups_padded, 2, 32, 8)
    words = rec[..., 1024:].contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    flag = words[..., FLAG4_WORD if warpgroup else FLAG_WORD] != 0
    meta = words.view(steps, groups_padded, 32, 2)
    k_total = steps * STEP_K
    dense = torch.zeros(groups_padded * ROWS, k_total, dtype=torch.float32)
    lane = torch.arange(32).view(32, 1)
    v = torch.arange(8).view(1, 8)
    g, q, r, e = lane // 4, lane % 4, v // 2, v % 2
    row = g + 8 * (r % 2)
    chunk = q + 4 * (r // 2)
    for s in range(steps):
        for grp in range(groups_padded):
            for h in range(2):
                if h == 1 and not bool(flag[s, grp]):
                    continue
                word = meta[s, grp, 4 * g + chunk // 4, h]  # [32, 8]
                nib = (word >> (16 * (r % 2) + 4 * (chunk % 4))) & 0xF
                position = torch.where(e == 0, nib & 3, nib >> 2)
                col = s * STEP_K + CHUNK * chunk + position
                dense.index_put_((grp * ROWS + row, col), vals[s, grp, h], accumulate=True)
    slots = layer.tile_rows.to(torch.int64).cpu()
    out = torch.zeros(layer.out_channels, layer.row_length, dtype=torch.float32)
    live = slots >= 0
    out[slots[live]] = dense[: slots.numel()][live][:, : layer.row_length]
    return out


def mma_ratio(layer, warpgroup: bool = False) -> float:
    """The kernel's MMAs over a dense layer's: one sparse MMA (twice a dense one's work) for each group's k-step,
    and one more where its second half has a nonzero (``warpgroup``: where that of any of its four has, as the
    wgmma kernel runs them); the tiles' real groups only."""
    _, _, second, _ = split_tiles(layer)
    if warpgroup:
        second = _flag4(second)
    groups = -(-layer.tile_rows.numel() // ROWS)
    return 0.5 * (1.0 + float(second[:, :groups].float().mean())) if second.numel() else 1.0
