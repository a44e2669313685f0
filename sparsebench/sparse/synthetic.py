"""Random sparse (and quantized) layers, for the kernel tests and the kernel-only benchmark."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from sparsebench.sparse.format import PackedLayer, pack_weight


def random_sparse_weight(
    shape: Sequence[int], sparsity: float, gen: torch.Generator, empty_rows: int = 0, row_skew: float = 0.0
) -> torch.Tensor:
    """Gaussian weight with exactly round(sparsity * numel) zeros at random places (+ some all-zero rows).

    ``row_skew`` > 0 spreads the nonzeros unevenly over the rows (output channels), as magnitude
    pruning of a trained layer does: each row's share is lognormal with this sigma."""
    w = torch.randn(*shape, generator=gen)
    flat = w.view(-1)
    nzero = int(round(sparsity * flat.numel()))
    if row_skew > 0:
        rows = w.view(shape[0], -1)
        counts = skewed_row_counts(shape[0], rows.shape[1], flat.numel() - nzero, row_skew, gen)
        for row, keep in zip(rows, counts.tolist()):
            row[torch.randperm(row.numel(), generator=gen)[keep:]] = 0.0
    elif nzero:
        flat[torch.randperm(flat.numel(), generator=gen)[:nzero]] = 0.0
    if empty_rows:
        w[torch.randperm(shape[0], generator=gen)[:empty_rows]] = 0.0
    return w


def skewed_row_counts(rows: int, row_length: int, nnz: int, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """Nonzeros per row summing to exactly ``nnz``, each at most ``row_length``, the rows' shares
    lognormal with ``sigma``. Rows whose share exceeds a full row are filled and the rest is shared
    again among the others in proportion (water-filling), so more sigma never means flatter rows."""
    if not 0 <= nnz <= rows * row_length:
        raise ValueError(f"nnz={nnz} does not fit {rows} rows of {row_length}")
    weight = torch.softmax(sigma * torch.randn(rows, generator=gen, dtype=torch.float64), 0)  # no overflow
    counts = torch.zeros(rows, dtype=torch.long)
    full = torch.zeros(rows, dtype=torch.bool)
    left = nnz
    while True:
        free = (~full).nonzero().flatten()
        w = weight[free]
        w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1.0 / max(len(free), 1))
        share = w * left
        over = free[share >= row_length]
        if len(over) == 0:
            break
        full[over], counts[over] = True, row_length
        left -= row_length * len(over)
    # Largest remainders round the free rows' shares to whole nonzeros (each stays below a full row).
    counts[free] = share.floor().long()
    short = left - int(counts[free].sum())
    counts[free[(share - share.floor()).argsort(descending=True)[:short]]] += 1
    return counts


def linear_codes(weight: torch.Tensor, bits: int):
    """Symmetric per-output-channel linear quantization: (codes, scale, zero_point).

    Zeros stay zero, and a kept weight never rounds to zero (it takes the smallest level of
    its sign), so the packed layer has exactly the weight's sparsity."""
    rows = weight.shape[0]
    qmax = 2 ** (bits - 1) - 1
    amax = weight.reshape(rows, -1).abs().amax(dim=1).clamp_min(1e-8)
    scale = amax / qmax
    shape = (rows,) + (1,) * (weight.dim() - 1)
    zp = 2 ** (bits - 1)
    signed = torch.round(weight / scale.reshape(shape)).clamp(-qmax, qmax)
    signed = torch.where((weight != 0) & (signed == 0), torch.sign(weight), signed)
    return (signed + zp).to(torch.int32), scale, torch.full((rows,), zp, dtype=torch.int32)


def codebook_codes(weight: torch.Tensor, bits: int, gen: torch.Generator, per_channel: bool = False):
    """Nearest-level codes against a random codebook whose level 0 is exactly 0.0 (the rest sorted):
    one for the layer, or with ``per_channel`` one per output channel ([C_out, 2**bits], each scaled
    to its own channel's largest weight)."""
    rows = weight.reshape(weight.shape[0] if per_channel else 1, -1)
    levels = torch.sort(torch.randn(rows.shape[0], 2**bits, generator=gen), dim=1).values
    levels = levels * rows.abs().amax(dim=1, keepdim=True)
    levels[:, 0] = 0.0
    dist = (rows[:, :, None] - levels[:, None, 1:]).abs()
    codes = (dist.argmin(dim=2) + 1).reshape(weight.shape).to(torch.int32)
    codes[weight == 0] = 0
    return codes, levels if per_channel else levels[0]


def random_layer(
    shape: Sequence[int],
    sparsity: float,
    *,
    value: str = "float32",
    bits: Optional[int] = None,
    stride: int = 1,
    padding: int = 0,
    bias: bool = True,
    empty_rows: int = 0,
    row_skew: float = 0.0,
    per_channel: bool = False,
    seed: int = 0,
) -> PackedLayer:
    """A random PackedLayer. value: float32 | float16 | linear | codebook (the last two need bits);
    ``per_channel``: a codebook per output channel."""
    gen = torch.Generator().manual_seed(seed)
    w = random_sparse_weight(shape, sparsity, gen, empty_rows, row_skew)
    b = torch.randn(shape[0], generator=gen) if bias else None
    if value in ("float32", "float16"):
        return pack_weight(
            w, b, stride=stride, padding=padding, value_dtype=torch.float32 if value == "float32" else torch.float16
        )
    if value == "linear":
        codes, scale, zp = linear_codes(w, bits)
        return pack_weight(w, b, stride=stride, padding=padding, bits=bits, codes=codes, scale=scale, zero_point=zp)
    if value == "codebook":
        codes, levels = codebook_codes(w, bits, gen, per_channel)
        return pack_weight(w, b, stride=stride, padding=padding, bits=bits, codes=codes, codebook=levels)
    raise ValueError(f"value: expected float32, float16, linear or codebook, got {value!r}")
