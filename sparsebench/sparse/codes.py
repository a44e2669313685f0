"""Bit-packed codes and column-index widths: the storage primitives of the packed format and its tiles."""

from __future__ import annotations

import torch

CODE_BITS = (2, 4, 8)
# Flat column indices up to this many fit the unsigned 16-bit index stream.
INDEX16_LIMIT = 1 << 16


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (< 2**bits) into a uint8 stream, first code in the low bits."""
    per = 8 // bits
    c = codes.to(torch.int32).flatten()
    pad = (-c.numel()) % per
    if pad:
        c = torch.cat([c, c.new_zeros(pad)])
    c = c.reshape(-1, per)
    shifts = torch.arange(per, dtype=torch.int32, device=c.device) * bits
    return (c << shifts).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    idx = torch.arange(n, dtype=torch.int64, device=packed.device) * bits
    byte = packed.to(torch.int64)[idx >> 3]
    return (byte >> (idx & 7)) & ((1 << bits) - 1)


def index_tensor(cols: torch.Tensor, row_length: int) -> torch.Tensor:
    """Column indices as the format stores them: int16 read as unsigned up to 2**16 columns, else int32."""
    if row_length <= INDEX16_LIMIT:
        return torch.where(cols >= 32768, cols - 65536, cols).to(torch.int16).contiguous()
    return cols.to(torch.int32).contiguous()


def unsigned(cols: torch.Tensor) -> torch.Tensor:
    """Stored column indices as int64 (undoes the unsigned 16-bit storage)."""
    wide = cols.to(torch.int64)
    return wide & 0xFFFF if cols.dtype == torch.int16 else wide
