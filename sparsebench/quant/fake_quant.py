"""The QAT parametrization: ``weight -> fake_quant(weight)`` with a straight-through gradient.

Registered with ``torch.nn.utils.parametrize`` on each conv/linear weight. When the layer
feeds a BatchNorm, the folded weight ``w * f`` (f = gamma/sqrt(var+eps)) is what gets
quantized, and the result is divided back: ``Q(w*f)/f``. In eval mode the conv+BN then
computes exactly the packed (folded, quantized) conv.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import nn

from sparsebench.quant import grids
from sparsebench.quant.fold import bn_factor, safe_factor


class FakeQuant(nn.Module):
    """Fake-quantizes a weight onto one grid; the identity until ``active`` is set.

    State that the export and checkpoints need lives in buffers (and the LSQ scale in a
    parameter, so the optimizer trains it): ``scale`` / ``zero_point`` for linear and pow2,
    ``codebook`` for kmeans ([2**bits] for the layer, or [C_out, 2**bits] with ``per_channel``).
    """

    def __init__(
        self,
        method: str,
        bits: int,
        weight: torch.Tensor,
        *,
        symmetric: bool = True,
        per_channel: bool = True,
        learn_scale: bool = False,
        bn: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.method, self.bits = method, bits
        self.symmetric = symmetric if method == "linear" else True
        self.per_channel = per_channel and method in ("linear", "kmeans")  # pow2: one scale per layer
        self.learn_scale = learn_scale and method == "linear"
        self.active = False
        self._bn = (bn,) if bn is not None else ()  # a tuple: not registered, so not in state_dict twice
        n = weight.shape[0] if self.per_channel and method == "linear" else 1  # kmeans: the codebook is per channel
        ones = torch.ones(n, device=weight.device)
        if self.learn_scale:
            self.scale = nn.Parameter(ones.clone())
        else:
            self.register_buffer("scale", ones.clone())
        self.register_buffer("zero_point", torch.zeros(n, device=weight.device))
        if method == "kmeans":
            book_shape = (weight.shape[0], 1 << bits) if self.per_channel else (1 << bits,)
            self.register_buffer("codebook", torch.zeros(book_shape, device=weight.device))
        # LSQ: gradient of the step size scaled by 1/sqrt(weights per scale * qmax).
        qmax = grids.code_range(bits, self.symmetric)[1]
        self._grad_factor = 1.0 / math.sqrt(max(1, weight.numel() // n) * max(1, qmax))

    # -- folding ---------------------------------------------------------------------
    def fold_factor(self) -> Optional[torch.Tensor]:
        return safe_factor(bn_factor(self._bn[0])) if self._bn else None

    def _fold(self, w: torch.Tensor, f: Optional[torch.Tensor], inverse: bool = False) -> torch.Tensor:
        if f is None:
            return w
        f = f.to(w.device).reshape(-1, *([1] * (w.dim() - 1)))
        return w / f if inverse else w * f

    # -- the grid ----------------------------------------------------------------------
    def levels(self) -> torch.Tensor:
        """The sorted level set of pow2 / kmeans (every value a weight may take): [L], or [C_out, L] per channel."""
        if self.method == "pow2":
            return grids.pow2_levels(self.bits, self.scale)
        if self.method == "kmeans":
            return self.codebook
        raise ValueError(f"levels: method {self.method!r} has a per-scale grid, not one level set")

    @torch.no_grad()
    def calibrate(self, w: torch.Tensor, kmeans_iters: int = 30, warm: bool = False) -> None:
        """Set the grid from the current (folded) weights: scales from statistics, codebook by k-means."""
        wf = self._fold(w.detach().float(), self.fold_factor())
        if self.method == "linear":
            scale, zero_point = grids.linear_stats(wf, self.bits, self.symmetric, self.per_channel)
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
        elif self.method == "pow2":
            self.scale.copy_(wf.abs().amax().clamp(min=torch.finfo(torch.float32).tiny).reshape(1))
        else:  # a channel (or layer) pruned below its level count keeps one level per value
            rows = wf.reshape(wf.shape[0], -1) if self.per_channel else wf[wf != 0].reshape(1, -1)
            n_free = self.codebook.shape[-1] - 1
            init = self.codebook if warm else None
            self.codebook.copy_(grids.fit_codebook(rows, n_free, kmeans_iters, init).reshape(self.codebook.shape))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return w
        f = self.fold_factor()
        return self._fold(self.quantize_folded(self._fold(w, f)), f, inverse=True).to(w.dtype)

    def quantize_folded(self, wf: torch.Tensor) -> torch.Tensor:
        """The folded weight on the grid: exactly the values the packed layer decodes to."""
        if self.method == "linear":
            return self._linear(wf)
        return grids.level_fake_quant(wf, self.levels().to(wf))

    def folded_input(self, w: torch.Tensor) -> torch.Tensor:
        return self._fold(w, self.fold_factor())

    def _linear(self, wf: torch.Tensor) -> torch.Tensor:
        if self.learn_scale:
            scale = grids.scale_grad(self.scale.abs().clamp(min=1e-12), self._grad_factor)
            if not self.symmetric:
                with torch.no_grad():
                    self.zero_point.copy_(grids.asym_zero_point(wf, scale, self.bits, self.per_channel))
        else:  # statistics, recomputed every step so they follow the pruned, trained weights
            scale, zero_point = grids.linear_stats(wf, self.bits, self.symmetric, self.per_channel)
            with torch.no_grad():
                self.scale.copy_(scale)
                self.zero_point.copy_(zero_point)
        return grids.linear_fake_quant(wf, scale, self.zero_point, self.bits, self.symmetric)

    # -- export ------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, folded_weight: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Codes and grid of an already fake-quantized, folded weight, as ``pack_weight`` takes them."""
        w = folded_weight.detach().float()
        if self.method == "linear":
            scale = self.scale.detach().abs().clamp(min=1e-12).float()
            codes = grids.linear_codes(w, scale, self.zero_point, self.bits, self.symmetric).to(torch.int64)
            return {"codes": codes, "scale": scale.clone(), "zero_point": self.zero_point.detach().clone()}
        levels = self.levels().detach().float()
        return {"codes": grids.nearest_level(w, levels), "codebook": levels.clone()}

    def extra_repr(self) -> str:
        return f"method={self.method}, bits={self.bits}, per_channel={self.per_channel}, active={self.active}"
