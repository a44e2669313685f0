"""QAT as a training hook: fake-quant parametrizations on every conv/linear weight.

Lifecycle: ``on_fit_start`` registers an (inactive) ``FakeQuant`` per quantized layer, last
in the weight's parametrization chain, so a pruning mask registered before it is applied
first and the quantizer sees exact zeros (zero is a level of every grid, so they stay
zero). At ``quant.start`` the grids are calibrated on the current weights and
quantization switches on; kmeans codebooks (one per layer, or per output channel with
``kmeans_per_channel``) are re-fitted every ``refit_every`` epochs (never after the last, so the
model evaluated there is the one baked).
``on_fit_end`` bakes the quantized weights into the plain parameters (the model leaves
training with nothing but ordinary conv/linear layers) and keeps the grids for the export.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsebench.errors import ConfigError
from sparsebench.layers import resolve_overrides, weight_layers
from sparsebench.quant.config import FP32
from sparsebench.quant.fake_quant import FakeQuant
from sparsebench.quant.fold import bn_pairs
from sparsebench.train import TrainHook

if TYPE_CHECKING:  # annotations only: no import at run time
    from sparsebench.quant.config import QuantConfig

log = logging.getLogger(__name__)


def layer_bits(cfg: QuantConfig, names: List[str]) -> Dict[str, Tuple[int, str]]:
    """(bits, the config key that set them) per layer: ``quant.bits``, or the override matching
    it (an exact name first, else the last matching regex, full match). 32 keeps a layer fp32.
    An override that names no layer is refused."""
    overrides = {str(k): int(v) for k, v in cfg.overrides.items()}
    chosen, unmatched = resolve_overrides(names, list(overrides))
    if unmatched:
        raise ConfigError(
            f"quant.overrides.{unmatched[0]}: matches no conv/linear layer of this model "
            f"(full match; the layers are: {', '.join(names)})"
        )
    return {
        name: (overrides[chosen[name]], f"quant.overrides.{chosen[name]}")
        if name in chosen
        else (int(cfg.bits), "quant.bits")
        for name in names
    }


def check_codebook_fits(name: str, weight: torch.Tensor, bits: int, key: str) -> None:
    """A kmeans layer with one codebook needs at least as many non-zero weights as free codebook levels.
    (Per-channel codebooks need not: a channel with fewer weights than levels gives each its own level.)"""
    nonzero = int((weight != 0).sum())
    levels = (1 << bits) - 1
    if nonzero < levels:
        raise ConfigError(
            f"{key}={bits} is not allowed for layer {name!r}: its kmeans codebook has {levels} "
            f"levels besides zero but the layer has only {nonzero} non-zero weights; lower the bits "
            f"(quant.overrides can set them per layer)"
        )


class Quantizer(TrainHook):
    """The ``quant`` hook: QAT with straight-through fake quantization, then baked weights."""

    name = "quant"

    def __init__(self, cfg: QuantConfig, model: nn.Module):
        self.cfg = cfg
        self.method = cfg.method
        names = list(weight_layers(model))
        chosen = layer_bits(cfg, names)
        self.bits = {n: b for n, (b, _) in chosen.items() if b != FP32}
        self.bits_key = {n: key for n, (_, key) in chosen.items()}  # for error messages
        self.fold_pairs = bn_pairs(model)
        self.per_channel_codebooks = self.method == "kmeans" and bool(cfg.kmeans_per_channel)
        if self.method == "kmeans" and not self.per_channel_codebooks:
            for name, m in weight_layers(model).items():
                if name in self.bits:
                    check_codebook_fits(name, m.weight, self.bits[name], self.bits_key[name])
        self.fake_quants: Dict[str, FakeQuant] = {}
        self.active = False
        self.start_step = 0
        self.steps_per_epoch = 1
        self.total_steps = 1
        self.fits = 0  # kmeans: codebook fits so far

    # -- the training lifecycle ----------------------------------------------------------
    def on_fit_start(self, model: nn.Module, steps_per_epoch: int, total_steps: int) -> None:
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.total_steps = total_steps
        per_unit = total_steps if self.cfg.unit == "fraction" else self.steps_per_epoch
        self.start_step = int(math.ceil(self.cfg.start * per_unit))
        modules = dict(model.named_modules())
        self.fake_quants = {}
        for name, m in weight_layers(model).items():
            if name not in self.bits:
                continue
            chain = m.parametrizations.weight if parametrize.is_parametrized(m, "weight") else []
            if any(isinstance(p, FakeQuant) for p in chain):
                raise RuntimeError(f"quant: layer {name} is already fake-quantized (on_fit_start called twice)")
            bn = modules.get(self.fold_pairs[name]) if name in self.fold_pairs else None
            per_channel = self.per_channel_codebooks or (self.method != "kmeans" and self.cfg.per_channel)
            fq = FakeQuant(
                self.method,
                self.bits[name],
                m.weight,
                symmetric=self.cfg.symmetric,
                per_channel=per_channel,
                learn_scale=self.cfg.learn_scale,
                bn=bn,
            )
            parametrize.register_parametrization(m, "weight", fq)
            self.fake_quants[name] = fq
        self.active = False
        if self.start_step == 0:
            self._activate(model)

    def after_step(self, step: int, model: nn.Module) -> None:
        # Not at the very last step: QAT that no step trains is the post-training case of on_fit_end.
        if not self.active and self.start_step <= step < self.total_steps:
            self._activate(model)

    def on_epoch_end(self, epoch: int, model: nn.Module) -> Dict[str, float]:
        if not self.active:
            return {"quant/active": 0.0}
        start_epoch = self.start_step // self.steps_per_epoch
        # Never after the last epoch: no step would adapt the weights to that codebook, and the model
        # evaluated at that epoch's end would not be the one exported (VGG-16 at 0%: 91.54 -> 91.09%).
        # Nor at the end of the epoch whose last step switched QAT on: the grids were just fitted.
        last = (epoch + 1) * self.steps_per_epoch >= self.total_steps
        just_started = epoch + 1 <= start_epoch
        if (
            self.method == "kmeans"
            and not last
            and not just_started
            and (epoch + 1 - start_epoch) % self.cfg.refit_every == 0
        ):
            self._calibrate(model, warm=True)
        return {"quant/active": 1.0}

    def on_evaluate(self, epoch: int, model: nn.Module) -> Dict[str, float]:
        # A diagnostic that quantizes every weight once more: at the scored epochs, beside the accuracy.
        if not self.active:
            return {}
        return {"quant/max_levels": float(max(self.distinct_levels(model).values(), default=0))}

    def on_fit_end(self, model: nn.Module) -> None:
        if not self.active:  # quant.start at or past the end: quantize after training (no QAT)
            log.warning(
                "quant.start=%s is not before the end of the finetune phase: the weights are quantized "
                "after training, without quantization-aware retraining",
                self.cfg.start,
            )
            self._activate(model)
        self.bake(model)

    # -- grids -----------------------------------------------------------------------------
    def _activate(self, model: nn.Module) -> None:
        self._calibrate(model, warm=False)
        for fq in self.fake_quants.values():
            fq.active = True
        self.active = True

    @torch.no_grad()
    def _calibrate(self, model: nn.Module, warm: bool) -> None:
        layers = weight_layers(model)
        for name, fq in self.fake_quants.items():
            w = _input_of(layers[name], fq)
            nonzero = int((w != 0).sum())
            if self.method == "kmeans" and not self.per_channel_codebooks and nonzero < (1 << self.bits[name]) - 1:
                # Refused up front on the dense weights; pruning got here later, so warn, not fail the run.
                log.warning(
                    "quant: layer %s has %d non-zero weights after pruning, fewer than its %d codebook "
                    "levels; each keeps its own level",
                    name,
                    nonzero,
                    (1 << self.bits[name]) - 1,
                )
            fq.calibrate(w, self.cfg.kmeans_iters, warm=warm)
        if self.method == "kmeans":
            self.fits += 1

    @torch.no_grad()
    def bake(self, model: nn.Module) -> None:
        """Write the quantized weights into the plain parameters and drop the parametrizations.

        The whole chain (a pruning mask included, if it is still registered) is evaluated once
        more, which also leaves the grids (statistics scales) exactly as they produced the
        baked values.
        """
        for m in weight_layers(model).values():
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)

    def distinct_levels(self, model: nn.Module) -> Dict[str, int]:
        """Distinct values of each quantized layer's folded, quantized weight (while training):
        at most 2**bits per grid (per channel for per-channel linear or kmeans, else per layer)."""
        layers = weight_layers(model)
        counts = {}
        with torch.no_grad():
            for name, fq in self.fake_quants.items():
                if not parametrize.is_parametrized(layers[name], "weight"):
                    continue  # baked: count on the export instead
                wf = fq.quantize_folded(fq.folded_input(_input_of(layers[name], fq)))
                counts[name] = _most_distinct_per_row(
                    wf.reshape(wf.shape[0], -1) if fq.per_channel else wf.reshape(1, -1)
                )
        # One host sync for the whole model, not one per channel (4,810 on ResNet-18, each
        # waiting its turn on a shared GPU).
        return dict(zip(counts, torch.stack(list(counts.values())).tolist())) if counts else {}

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {
            "method": self.method,
            "bits": dict(self.bits),
            "active": self.active,
            "fits": self.fits,
            "per_channel_codebooks": self.per_channel_codebooks,
            "grids": {
                name: {k: v.detach().cpu().clone() for k, v in fq.state_dict().items()}
                for name, fq in self.fake_quants.items()
            },
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not state:
            return
        if state.get("method") != self.method or state.get("bits") != self.bits:
            raise ConfigError(
                f"trainer.resume=true: the checkpoint was quantized with quant.method="
                f"{state.get('method')} and bits {state.get('bits')}, this run asks for "
                f"quant.method={self.method} and bits {self.bits}"
            )
        if state.get("per_channel_codebooks", False) != self.per_channel_codebooks:  # absent: per layer
            raise ConfigError(
                f"trainer.resume=true: the checkpoint was quantized with quant.kmeans_per_channel="
                f"{state.get('per_channel_codebooks', False)}, this run asks for "
                f"quant.kmeans_per_channel={self.per_channel_codebooks}"
            )
        for name, grid in state.get("grids", {}).items():
            if name in self.fake_quants:
                self.fake_quants[name].load_state_dict(grid)
        self.active = bool(state.get("active"))
        self.fits = int(state.get("fits", 0))
        for fq in self.fake_quants.values():
            fq.active = self.active


def _most_distinct_per_row(rows: torch.Tensor) -> torch.Tensor:
    """The largest number of distinct values in one row of ``rows`` [R, N], as a 0-d tensor."""
    ordered = rows.sort(dim=1).values
    return (1 + (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1)).max()


def _input_of(module: nn.Module, fq: FakeQuant) -> torch.Tensor:
    """The tensor ``fq`` receives: the original weight through the parametrizations before it."""
    chain = module.parametrizations.weight
    x = chain.original
    for p in chain:
        if p is fq:
            return x
        x = p(x)
    raise ValueError("the quantizer's parametrization is not registered on this layer")


def build_quantizer(cfg: QuantConfig, model: nn.Module) -> Optional[TrainHook]:
    """The QAT hook for ``cfg`` (a QuantConfig), or None for ``quant=none``.

    Checks what needs the model before any training: per-layer overrides must name a layer,
    and a layer's one kmeans codebook must not have more levels than the layer has non-zero weights.
    """
    if cfg.method == "none":
        return None
    return Quantizer(cfg, model)
