"""The pruning hook: magnitude masks on a schedule, kept exactly zero while retraining.

Pruned weights are zeroed in place and kept at zero by two cheap steps each iteration:
their gradients are zeroed before the optimizer step (so weight decay and fresh momentum
have nothing to add), and the weights are zeroed again right after it (momentum left over
from before the cut would otherwise revive them). The model keeps its plain parameters, so
checkpoints, dense.pt and the export see an ordinary state_dict with real zeros.

With ``regrow_until`` the masks can also let pruned weights back (RigL, Evci et al. 2020; with
gradual pruning as in GraNet, Liu et al. 2021): at each mask event until then, after pruning to
the event's target, a fraction of each layer's live weights (``regrow_fraction``, decaying on a
cosine from the first cut to 0 at ``regrow_until``) with the smallest magnitudes is dropped and
as many pruned weights with the largest gradients grow back, at zero. The gradient is the last
step's, taken before its pruned entries are zeroed. The hook does not see the optimizer, so a
grown weight keeps what is left of its momentum from before it was pruned (SGD: 0.9^k after k
steps, ~0.006 after a quarter epoch of VGG-16).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from sparsebench.errors import ConfigError
from sparsebench.layers import macs_per_weight as count_macs_per_weight
from sparsebench.layers import weight_layers
from sparsebench.prune.config import prunes
from sparsebench.prune.masks import drop_and_grow, global_magnitude_masks, magnitude_mask, weight_param
from sparsebench.prune.schedule import build_schedule, progress_at, to_steps
from sparsebench.prune.selection import final_targets, prunable_layers
from sparsebench.train import TrainHook

if TYPE_CHECKING:  # annotations only: no import at run time
    from sparsebench.prune.config import PruneConfig

log = logging.getLogger("sparsebench.prune")


class MagnitudePruner(TrainHook):
    """``prune=agp|iterative|oneshot`` with ``scope=layer|global``; ``layer_names`` are the prunable layers.
    ``macs_per_weight`` (``layers.macs_per_weight``) is needed with ``macs_exponent``."""

    name = "prune"

    def __init__(self, cfg: PruneConfig, model: nn.Module, macs_per_weight: Optional[Dict[str, int]] = None):
        self.cfg = cfg
        self.layers = prunable_layers(model, cfg)
        self.layer_names = list(self.layers)
        self.final, self.overridden = final_targets(self.layer_names, cfg, list(weight_layers(model)))
        # scope=global: the layers under one threshold (an overridden layer keeps its own target).
        self.pooled = [n for n in self.layer_names if n not in self.overridden] if cfg.scope == "global" else []
        self.score_scale = _score_scale(self.pooled, macs_per_weight, float(cfg.macs_exponent))
        # A layer overridden below the initial sparsity starts at its own target.
        self.initial = {n: min(float(cfg.initial_sparsity), f) for n, f in self.final.items()}
        self.schedule: Dict[int, float] = {}
        self.masks: Dict[str, Tensor] = {}
        self.regrow_end_step = 0  # regrow_until in steps (0: masks only grow)
        self.first_cut_step = 0  # the schedule's first event, where the regrowth fraction starts to decay
        self.grads: Dict[str, Tensor] = {}  # |gradient| of the step before a regrowing mask event
        self.regrown: Tensor | int = 0  # weights grown back since the last epoch end (a tensor: no sync per event)
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
        for n in self.layer_names:
            if n not in self.pooled:
                self.masks[n] = magnitude_mask(weights[n], self.target(n, progress), self.masks.get(n))
        if self.pooled:
            self.masks.update(
                global_magnitude_masks(
                    {n: weights[n] for n in self.pooled},
                    self.nominal_target(progress),
                    {n: self.masks[n] for n in self.pooled if n in self.masks},
                    self.score_scale,
                    float(self.cfg.max_layer_sparsity),
                )
            )
            if progress >= 1 and self.progress != progress:  # the final masks, once: an empty layer cuts the signal
                empty = torch.stack([~self.masks[n].any() for n in self.pooled]).tolist()  # one sync
                if any(empty):
                    log.warning(
                        "prune: %s lost every weight under the one threshold; set prune.max_layer_sparsity "
                        "below 1 to keep some",
                        ", ".join(n for n, e in zip(self.pooled, empty) if e),
                    )
        if self.grads:
            self.apply_masks()  # grown weights enter at zero, not where old momentum moved them this step
            fraction = self.regrow_fraction_at(self.step)
            for n, grad in self.grads.items():
                mask = drop_and_grow(weights[n], self.masks[n], grad, fraction)
                self.regrown = self.regrown + (mask & ~self.masks[n]).sum()
                self.masks[n] = mask
            self.grads = {}
        self.progress = progress
        self.apply_masks()
        if log.isEnabledFor(logging.DEBUG):  # counting zeros syncs a GPU: only when asked for
            log.debug("pruning after step %d: progress %.4f, sparsity %.4f", self.step, progress, self.sparsity())

    def regrow_fraction_at(self, step: int) -> float:
        """RigL's cosine decay: ``regrow_fraction`` at the first cut, none from ``regrow_until`` on."""
        first = self.first_cut_step
        if step >= self.regrow_end_step or step < first:
            return 0.0
        t = (step - first) / (self.regrow_end_step - first)
        return 0.5 * float(self.cfg.regrow_fraction) * (1 + math.cos(math.pi * t))

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
        self.first_cut_step = min(self.schedule)
        if self.cfg.regrow_until is not None:
            self.regrow_end_step = to_steps(self.cfg.regrow_until, self.cfg.unit, steps_per_epoch, total_steps)
        self.masks, self.grads, self.regrown = {}, {}, 0
        self.progress, self.step = None, 0
        if 0 in self.schedule:  # an event at step 0 prunes before the first update
            self.update_masks(self.schedule[0])

    def before_step(self, step: int, model: nn.Module) -> None:
        # The mask event after this step may regrow weights: keep the gradient of the pruned ones too.
        regrows = step + 1 in self.schedule and self.regrow_fraction_at(step + 1) > 0
        for n, mask in self.masks.items():
            grad = weight_param(self.layers[n]).grad
            if grad is not None:
                if regrows:
                    self.grads[n] = grad.abs()
                grad.masked_fill_(~mask, 0.0)

    def after_step(self, step: int, model: nn.Module) -> None:
        self.step = step
        if step in self.schedule:
            self.update_masks(self.schedule[step])
        else:
            self.apply_masks()

    def on_epoch_end(self, epoch: int, model: nn.Module) -> Dict[str, float]:
        with torch.no_grad():
            metrics = {f"sparsity/{n}": float((self.layers[n].weight == 0).float().mean()) for n in self.layer_names}
        metrics["sparsity/prunable"] = self.sparsity()
        metrics["sparsity/target"] = self.nominal_target(progress_at(self.schedule, self.step))
        if self.regrow_end_step:
            metrics["sparsity/regrown"], self.regrown = float(self.regrown), 0
        return metrics

    def state_dict(self) -> Dict[str, Any]:
        return {"masks": {n: m.cpu() for n, m in self.masks.items()}, "progress": self.progress, "step": self.step}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not state:
            return
        self.masks = {n: m.to(weight_param(self.layers[n]).device) for n, m in state["masks"].items()}
        self.progress, self.step = state["progress"], int(state["step"])
        self.apply_masks()


def _score_scale(pooled: List[str], macs_per_weight: Optional[Dict[str, int]], exponent: float) -> Dict[str, float]:
    """What each pooled layer's magnitudes are multiplied by before the one threshold: its weights'
    multiply-adds to the power -``exponent``, relative to the cheapest layer's (1 at exponent 0)."""
    if not exponent:
        return {}
    missing = [n for n in pooled if not (macs_per_weight or {}).get(n)]
    if missing:
        raise ConfigError(
            f"prune.macs_exponent={exponent}: the forward pass never reaches {', '.join(missing)}, "
            "so its compute is unknown (leave it out with prune.layers)"
        )
    if len(pooled) < 2:
        log.warning("prune.macs_exponent=%s does nothing: fewer than two layers share the threshold", exponent)
    cheapest = min((macs_per_weight[n] for n in pooled), default=1)
    return {n: (macs_per_weight[n] / cheapest) ** -exponent for n in pooled}


def build_pruner(cfg: PruneConfig, model: nn.Module, sample: Optional[Tensor] = None) -> Optional[TrainHook]:
    """The pruning hook for ``cfg`` (a PruneConfig), or None when it prunes nothing
    (``prune=none``, or every target 0). ``sample``, an input batch, shows each weight's
    multiply-adds, which ``prune.macs_exponent`` weighs by.

    Checks what needs the model (layer regex, overrides) here, before any training.
    """
    if not prunes(cfg):
        return None
    if cfg.macs_exponent and sample is None:
        raise ValueError("prune.macs_exponent needs a sample input to count each weight's multiply-adds")
    return MagnitudePruner(cfg, model, count_macs_per_weight(model, sample) if cfg.macs_exponent else None)
