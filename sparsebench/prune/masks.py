"""Magnitude masks with exact counts, per layer or with one threshold over many layers, and
RigL's drop-and-grow update.

Magnitude masks only grow: weights pruned earlier sort below every live weight, so a later
(higher) target keeps them pruned even when a live weight is exactly zero too; only
``drop_and_grow`` lets a pruned weight back. Sorting is stable, so ties are broken the same way
on every run.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize


def weight_param(module: nn.Module) -> Tensor:
    """The trainable tensor behind ``module.weight`` (the original under a parametrization, e.g. QAT)."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations["weight"].original
    return module.weight


def prune_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights to prune for ``sparsity``, rounded to the nearest (half up)."""
    return min(numel, int(math.floor(sparsity * numel + 0.5)))


def _scores(weight: Tensor, previous: Optional[Tensor], scale: float = 1.0) -> Tensor:
    score = weight.detach().abs().flatten().float() * scale
    if previous is not None:  # already pruned: below any live weight, so they stay pruned
        score = torch.where(previous.flatten(), score, torch.full_like(score, -1.0))
    return score


def _mask_from_order(order: Tensor, k: int, numel: int, device: torch.device) -> Tensor:
    keep = torch.ones(numel, dtype=torch.bool, device=device)
    keep[order[:k]] = False
    return keep


@torch.no_grad()
def magnitude_mask(weight: Tensor, sparsity: float, previous: Optional[Tensor] = None) -> Tensor:
    """Boolean keep-mask (shape of ``weight``) pruning exactly ``prune_count`` smallest magnitudes."""
    score = _scores(weight, previous)
    k = prune_count(score.numel(), sparsity)
    order = torch.argsort(score, stable=True)
    return _mask_from_order(order, k, score.numel(), weight.device).view_as(weight)


@torch.no_grad()
def global_magnitude_masks(
    weights: Dict[str, Tensor],
    sparsity: float,
    previous: Optional[Dict[str, Tensor]] = None,
    scale: Optional[Dict[str, float]] = None,
    max_layer_sparsity: float = 1.0,
) -> Dict[str, Tensor]:
    """Keep-masks for ``weights`` that prune ``sparsity`` of all their weights together:
    one magnitude threshold, so layers end at different sparsities. ``scale`` multiplies a
    layer's magnitudes before they meet the threshold (default 1). No layer loses more than
    ``max_layer_sparsity`` of its weights: past it, the threshold takes the rest from the others
    (fewer in all only when every layer is at its ceiling)."""
    names: List[str] = list(weights)
    if not names:
        return {}
    previous, scale = previous or {}, scale or {}
    device = weights[names[0]].device
    per_layer = [_scores(weights[n], previous.get(n), scale.get(n, 1.0)).to(device) for n in names]
    k = prune_count(sum(s.numel() for s in per_layer), sparsity)
    if max_layer_sparsity < 1:  # only a layer's `ceiling` lowest scores may meet the threshold
        ceilings = [min(prune_count(s.numel(), max_layer_sparsity), s.numel() - 1) for s in per_layer]  # keep one
        per_layer = [_only_lowest(s, c) for s, c in zip(per_layer, ceilings)]
        k = min(k, sum(ceilings))
    scores = torch.cat(per_layer)
    keep = _mask_from_order(torch.argsort(scores, stable=True), k, scores.numel(), device)
    masks, offset = {}, 0
    for n in names:
        w = weights[n]
        masks[n] = keep[offset : offset + w.numel()].view_as(w).to(w.device)
        offset += w.numel()
    return masks


def _only_lowest(score: Tensor, ceiling: int) -> Tensor:
    """``score`` with all but its ``ceiling`` lowest entries out of the threshold's reach (+inf)."""
    out = torch.full_like(score, math.inf)
    lowest = torch.argsort(score, stable=True)[:ceiling]
    out[lowest] = score[lowest]
    return out


@torch.no_grad()
def drop_and_grow(weight: Tensor, keep: Tensor, grad: Tensor, fraction: float) -> Tensor:
    """RigL's mask update (Evci et al. 2020): the ``fraction`` of live weights with the smallest
    magnitudes make way for as many pruned ones with the largest gradient magnitudes.

    The count of live weights is unchanged; a grown weight enters at its current value (zero: it
    was pruned), so the network's function does not jump. Just-dropped weights cannot grow back.
    """
    live = keep.flatten()
    n = int(fraction * int(live.sum()))
    n = min(n, int((~live).sum()))
    if n == 0:
        return keep
    magnitude, gradient = weight.detach().abs().flatten().float(), grad.detach().abs().flatten().float()
    drop = torch.argsort(magnitude.masked_fill(~live, math.inf), stable=True)[:n]  # the weakest live weights
    grow = torch.argsort(gradient.masked_fill(live, -1.0), descending=True, stable=True)[
        :n
    ]  # the most wanted pruned ones
    new = live.clone()
    new[drop] = False
    new[grow] = True
    return new.view_as(keep)
