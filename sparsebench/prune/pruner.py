"""The pruning hook: magnitude masks on a schedule, kept exactly zero while retraining.

Pruned weights are zeroed in place and kept at zero by two cheap steps each iteration:
their gradients are zeroed before the optimizer step (so weight decay and fresh momentum
have nothing to add), and the weights are zeroed again right after it (momentum left over
from before the cut would otherwise revive them). The model keeps its plain parameters, so
checkpoints, dense.pt and the export see an ordinary state_dict with real zeros.

With ``regrow_until`` (masks that can regrow) the pruned weights keep training off the model:
their gradients are left in, so the optimizer step moves them off zero, and that move is added
to ``dormant`` (the pruned weights' own values; zero where a weight is live) before they are
zeroed again. The gradient taken at the pruned network so updates every weight
(straight-through), and each mask event chooses the masks afresh from ``|weight + dormant|``.
Dormant weights are decayed through their gradient (``weight_decay`` times their value), as SGD
decays the live ones; without it, noise alone would walk them back over the threshold.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from sparsebench.layers import weight_layers
from sparsebench.prune.masks import global_magnitude_masks, magnitude_mask, weight_param
from sparsebench.prune.schedule import build_schedule, progress_at
from sparsebench.prune.selection import final_targets, prunable_layers
from sparsebench.train import TrainHook

log = logging.getLogger("sparsebench.prune")


class MagnitudePruner(TrainHook):
    """``prune=agp|iterative|oneshot`` with ``scope=layer|global``; ``layer_names`` are the prunable layers."""

    name = "prune"

    def __init__(self, cfg: Any, model: nn.Module, weight_decay: float = 0.0):
        self.cfg = cfg
        self.weight_decay = weight_decay  # the optimizer's: applied to dormant weights with regrow_until
        self.layers = prunable_layers(model, cfg)
        self.layer_names = list(self.layers)
        self.final, self.overridden = final_targets(self.layer_names, cfg, list(weight_layers(model)))
        # A layer overridden below the initial sparsity starts at its own target.
        self.initial = {n: min(float(cfg.initial_sparsity), f) for n, f in self.final.items()}
        self.schedule: Dict[int, float] = {}
        self.masks: Dict[str, Tensor] = {}
        self.regrow = cfg.regrow_until is not None
        self.dormant: Dict[str, Tensor] = {}  # regrow: the pruned weights' values, kept off the model
        self.progress: Optional[float] = None  # schedule progress of the masks in force (None: no cut yet)
        self.step = 0  # optimizer steps of the finetune phase seen so far

    # ------------------------------------------------------------ targets

    def target(self, name: str, progress: float) -> float:
        """Layer ``name``'s sparsity at schedule ``progress`` (0..1)."""
        return self.initial[name] + (self.final[name] - self.initial[name]) * progress

    def nominal_target(self, progress: Optional[float]) -> float:
        """The schedule's sparsity for layers without an override (0 before the first cut)."""
        s0, s1 = float(self.cfg.initial_sparsity), float(self.cfg.final_sparsity)
        return 0.0 if progress is None else s0 + (s1 - s0) * progress

    # ------------------------------------------------------------ masks

    @torch.no_grad()
    def update_masks(self, progress: float) -> None:
        """Recompute the masks for ``progress`` from the current magnitudes, and apply them."""
        weights = {n: weight_param(m) for n, m in self.layers.items()}
        previous = self.masks  # pruned weights stay pruned ...
        if self.regrow:  # ... unless they may regrow: then every weight competes at its full value
            weights = {n: w + self.dormant[n] if n in self.dormant else w.clone() for n, w in weights.items()}
            previous = {}
        pooled = [n for n in self.layer_names if n not in self.overridden] if self.cfg.scope == "global" else []
        for n in self.layer_names:
            if n not in pooled:
                self.masks[n] = magnitude_mask(weights[n], self.target(n, progress), previous.get(n))
        if pooled:
            self.masks.update(global_magnitude_masks({n: weights[n] for n in pooled}, self.nominal_target(progress),
                                                     {n: previous[n] for n in pooled if n in previous}))
        self.progress = progress
        if self.regrow:  # live weights (revived ones too) on the model, pruned ones dormant
            for n, mask in self.masks.items():
                weight_param(self.layers[n]).copy_(weights[n].masked_fill(~mask, 0.0))
                self.dormant[n] = weights[n].masked_fill_(mask, 0.0)
        self.apply_masks()
        if log.isEnabledFor(logging.DEBUG):  # counting zeros syncs a GPU: only when asked for
            log.debug("pruning after step %d: progress %.4f, sparsity %.4f", self.step, progress, self.sparsity())

    @torch.no_grad()
    def apply_masks(self) -> None:
        for n, mask in self.masks.items():
            weight_param(self.layers[n]).masked_fill_(~mask, 0.0)

    @torch.no_grad()
    def sparsity(self) -> float:
        """Fraction of exact zeros over all prunable layers."""
        zeros = sum(int((self.layers[n].weight == 0).sum()) for n in self.layer_names)
        return zeros / max(sum(self.layers[n].weight.numel() for n in self.layer_names), 1)

    # ------------------------------------------------------------ the hook

    def on_fit_start(self, model: nn.Module, steps_per_epoch: int, total_steps: int) -> None:
        self.schedule = build_schedule(self.cfg, steps_per_epoch, total_steps)
        self.masks, self.dormant = {}, {}
        self.progress, self.step = None, 0
        if 0 in self.schedule:  # an event at step 0 prunes before the first update
            self.update_masks(self.schedule[0])

    def before_step(self, step: int, model: nn.Module) -> None:
        if self.regrow:  # pruned weights keep their gradients (after_step moves their update to `dormant`)
            if self.weight_decay:
                for n, dormant in self.dormant.items():
                    grad = weight_param(self.layers[n]).grad
                    if grad is not None:
                        grad.add_(dormant, alpha=self.weight_decay)
            return
        for n, mask in self.masks.items():
            grad = weight_param(self.layers[n]).grad
            if grad is not None:
                grad.masked_fill_(~mask, 0.0)

    def after_step(self, step: int, model: nn.Module) -> None:
        self.step = step
        if self.regrow:
            with torch.no_grad():
                for n, mask in self.masks.items():  # the step moved pruned weights off zero: that is their update
                    w = weight_param(self.layers[n])
                    self.dormant[n].add_(w.masked_fill(mask, 0.0))
                    w.masked_fill_(~mask, 0.0)
        if step in self.schedule:
            self.update_masks(self.schedule[step])
        elif not self.regrow:
            self.apply_masks()

    def on_epoch_end(self, epoch: int, model: nn.Module) -> Dict[str, float]:
        with torch.no_grad():
            metrics = {f"sparsity/{n}": float((self.layers[n].weight == 0).float().mean()) for n in self.layer_names}
        metrics["sparsity/prunable"] = self.sparsity()
        metrics["sparsity/target"] = self.nominal_target(progress_at(self.schedule, self.step))
        return metrics

    def state_dict(self) -> Dict[str, Any]:
        return {"masks": {n: m.cpu() for n, m in self.masks.items()}, "progress": self.progress, "step": self.step,
                "dormant": {n: d.cpu() for n, d in self.dormant.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not state:
            return
        self.masks = {n: m.to(weight_param(self.layers[n]).device) for n, m in state["masks"].items()}
        self.progress, self.step = state["progress"], int(state["step"])
        self.dormant = {n: d.to(weight_param(self.layers[n]).device) for n, d in state.get("dormant", {}).items()}
        self.apply_masks()
