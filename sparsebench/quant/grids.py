"""The quantization grids: linear (scale + zero point), power-of-two levels, k-means codebooks.

Every grid has zero as an exact level, so a pruned (zero) weight quantizes to exactly zero.
Values are computed exactly as the packed format decodes them (``scale * (code - zero_point)``
and ``codebook[code]``, or ``codebook[row, code]`` per channel), so the export reproduces the
fake-quantized weights bit for bit.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

# ---------------------------------------------------------------- straight-through helpers


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized value, bit for bit. Backward: the gradient passes to the input unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return q.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q forward (exactly), identity gradient to x."""
    return _StraightThrough.apply(x, q.detach())


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity gradient."""
    return straight_through(x, torch.round(x))


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x forward (exactly), gradient multiplied by ``factor`` (LSQ's step-size gradient scale)."""
    return _ScaleGrad.apply(x, factor)


# ---------------------------------------------------------------- linear


def code_range(bits: int, symmetric: bool) -> Tuple[int, int]:
    """Signed codes around zero for symmetric grids, unsigned codes with a zero point otherwise."""
    if symmetric:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _reduce_dims(w: torch.Tensor, per_channel: bool) -> Tuple[int, ...]:
    return tuple(range(1, w.dim())) if per_channel else tuple(range(w.dim()))


def _as_rows(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A per-channel [C] (or per-tensor [1]) tensor shaped to broadcast over w."""
    return t.reshape(-1, *([1] * (w.dim() - 1))) if t.numel() > 1 else t.reshape(())


def linear_stats(w: torch.Tensor, bits: int, symmetric: bool, per_channel: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point from the weights' range (max-abs, or min-max including 0).

    Returns 1-D tensors: [C_out] per channel, [1] per tensor. An all-zero channel gets scale 1
    (any scale decodes its zero codes to 0).
    """
    w = w.detach().float()
    dims = _reduce_dims(w, per_channel)
    qmin, qmax = code_range(bits, symmetric)
    if symmetric:
        scale = w.abs().amax(dim=dims) / qmax
        zero_point = torch.zeros_like(scale)
    else:
        lo = w.amin(dim=dims).clamp(max=0)
        hi = w.amax(dim=dims).clamp(min=0)
        scale = (hi - lo) / (qmax - qmin)
        zero_point = torch.round(-lo / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp(qmin, qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale.reshape(-1), zero_point.reshape(-1)


def asym_zero_point(w: torch.Tensor, scale: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
    """The zero point that puts the weights' minimum (or 0) at code 0 for a given (learned) scale."""
    qmin, qmax = code_range(bits, symmetric=False)
    lo = w.detach().float().amin(dim=_reduce_dims(w, per_channel)).clamp(max=0).reshape(-1)
    return torch.round(-lo / scale.detach().reshape(-1)).clamp(qmin, qmax)


def linear_codes(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool
) -> torch.Tensor:
    """Integer codes (as float, with straight-through rounding) of w on the grid."""
    qmin, qmax = code_range(bits, symmetric)
    return torch.clamp(round_ste(w / _as_rows(scale, w)) + _as_rows(zero_point, w), qmin, qmax)


def linear_fake_quant(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool
) -> torch.Tensor:
    """w snapped to ``scale * (code - zero_point)``; exact zeros stay exact zeros."""
    codes = linear_codes(w, scale, zero_point, bits, symmetric)
    return (codes - _as_rows(zero_point, w)) * _as_rows(scale, w)


# ---------------------------------------------------------------- level sets (pow2, kmeans)


def pow2_levels(bits: int, scale: torch.Tensor) -> torch.Tensor:
    """0 and ±scale·2^-k for k = 0..2^(bits-1)-2: a sign bit plus an exponent code, one code kept for zero.

    2^bits - 1 sorted levels (2 bits: the ternary {-s, 0, s}).
    """
    n_exp = (1 << (bits - 1)) - 1
    mags = scale.reshape(()).float() * torch.pow(2.0, -torch.arange(n_exp, dtype=torch.float32, device=scale.device))
    return torch.cat([-mags, mags.new_zeros(1), mags.flip(0)])


def nearest_level(w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index into sorted ``levels`` of the level nearest to each weight (ties go to the lower level).

    ``levels`` [L] is one level set for all of ``w``; [R, L] is one per row of ``w`` viewed as
    [R, -1] (a codebook per output channel)."""
    book = levels.reshape(-1, levels.shape[-1])
    mids = (book[:, 1:] + book[:, :-1]) / 2
    x = w.detach().float().reshape(book.shape[0], -1)
    return torch.searchsorted(mids.contiguous(), x.contiguous()).reshape(w.shape)


def level_values(levels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The levels at ``index`` (shaped like the weight, from ``nearest_level``): per row for [R, L] levels."""
    book = levels.reshape(-1, levels.shape[-1])
    return book.gather(1, index.reshape(book.shape[0], -1)).reshape(index.shape)


def level_fake_quant(w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """w snapped to its nearest level; straight-through gradient."""
    return straight_through(w, level_values(levels, nearest_level(w, levels)))


def fit_codebook(
    values: torch.Tensor, n_free: int, iters: int = 30, init: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """1-D k-means (Lloyd) with ``n_free`` free centres plus one fixed at exactly 0, for each row of ``values``.

    ``values`` [R, N] are R independent fits, run together (a per-channel codebook is one row per
    output channel; a 1-D tensor is one fit); exact zeros (pruned weights) are not fitted. Returns
    each row's n_free + 1 sorted levels: [R, n_free + 1], or [n_free + 1] for 1-D ``values``.
    Free centres start at the row's quantiles, or at its ``init`` codebook (the previous fit, so
    refits move smoothly) when that has a non-zero level and the row has n_free values or more.
    A row with fewer values than centres starts with a centre on each value (the rest repeat one),
    so each value keeps its own level; an all-zero row gets all-zero levels; an empty cluster keeps
    its centre. Always runs all ``iters`` iterations. Written here rather than with scikit-learn
    because it is 1-D (sorted buckets, no distance matrix), batched over rows and runs on the
    weights' device.
    """
    x = values.detach().float()
    rows = x if x.dim() > 1 else x.reshape(1, -1)
    if rows.shape[1] == 0:  # nothing to fit: all-zero levels, as for an all-zero row
        rows = rows.new_zeros(rows.shape[0], 1)
    n_rows, n_levels = rows.shape[0], n_free + 1
    n = (rows != 0).sum(dim=1)  # values per row
    # Each row's values sorted ascending, the zeros moved to its end and given no weight (they still
    # fall in the zero level's cluster, adding nothing to any sum or count).
    xs = torch.sort(torch.where(rows != 0, rows, torch.inf), dim=1).values
    weight = torch.isfinite(xs).float()
    xs = torch.where(weight > 0, xs, 0.0)
    quantile = (torch.arange(n_free, device=xs.device, dtype=torch.float64) + 0.5) / n_free
    pos = torch.minimum((quantile * n[:, None]).long(), (n - 1).clamp(min=0)[:, None])
    centres = xs.gather(1, pos)
    if init is not None:
        previous = init.detach().to(xs).reshape(n_rows, n_levels)
        warm = (previous != 0).any(dim=1) & (n >= n_free)
        centres = torch.where(warm[:, None], _drop_one_zero(previous), centres)
    zero = xs.new_zeros(n_rows, 1)
    first_of_row = (torch.arange(n_rows, device=xs.device) * n_levels)[:, None]  # one flat cluster id per (row, level)
    for _ in range(iters):
        levels, order = torch.sort(torch.cat([centres, zero], dim=1), dim=1)
        cluster = (nearest_level(xs, levels) + first_of_row).flatten()
        sums = xs.new_zeros(n_rows * n_levels).index_add_(0, cluster, xs.flatten()).reshape(n_rows, n_levels)
        counts = xs.new_zeros(n_rows * n_levels).index_add_(0, cluster, weight.flatten()).reshape(n_rows, n_levels)
        means = torch.where(counts > 0, sums / counts.clamp(min=1), levels)
        updated = torch.empty_like(levels).scatter_(1, order, means)  # back to (centres..., zero) order
        # All ``iters``, with no test for convergence: a converged fit stays put, and the test
        # is a host sync per iteration, which on a GPU that several jobs share waits for the
        # others' turns (a ResNet-18 refit beside four busy processes: 6.1 s with it, 1.1 s without).
        centres = updated[:, :-1]
    fitted = torch.sort(torch.cat([centres, zero], dim=1), dim=1).values
    return fitted if x.dim() > 1 else fitted.reshape(n_levels)


def _drop_one_zero(levels: torch.Tensor) -> torch.Tensor:
    """The free centres of each row's codebook [R, L]: all levels but its first exact zero (or the one nearest 0)."""
    zero_at = levels.abs().argmin(dim=1, keepdim=True)
    keep = torch.ones_like(levels, dtype=torch.bool).scatter_(1, zero_at, False)
    return levels[keep].reshape(levels.shape[0], -1)
