"""The pruning config (the `prune` group) and its checks.

Everything here is checked from the config alone, before any data or model exists; the
checks that need the model (does an override name a prunable layer?) run in
``build_pruner``, still before any training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

from sparsebench.errors import ConfigError, require

METHODS = ("none", "agp", "iterative", "oneshot")
UNITS = ("epoch", "step", "fraction")


@dataclass
class PruneConfig:
    method: str = "none"  # none | agp | iterative | oneshot
    initial_sparsity: float = 0.0  # agp / iterative: the sparsity of the first mask update
    final_sparsity: float = 0.0  # every prunable layer's target (unless overridden)
    # Schedule, in `unit`s from the start of the finetune phase (fraction: of the phase's length, so the
    # schedule scales with trainer.finetune_epochs; epoch; step). agp: cubic ramp from start
    # to end, masks updated every `frequency`; iterative: `rounds` equal sparsity steps
    # spread evenly over [start, end], retraining in between; oneshot: one cut at `start`.
    start: float = 0.0
    end: float = 0.0
    frequency: float = 1.0
    unit: str = "epoch"  # epoch | step | fraction
    rounds: int = 1  # iterative: number of prune-then-retrain cycles
    scope: str = "layer"  # layer: every layer to its target | global: one magnitude threshold
    # scope=global: rank weights by |w| / m^macs_exponent, m a weight's multiply-adds per sample (its
    # conv's output height x width). 0: magnitude alone, which keeps more of the early, high-resolution
    # layers and so more compute; 1: magnitude per multiply-add, which can strip an early layer nearly
    # bare (LeNet-5 at 95%: its second conv lost every weight). Try 0.5 with a max_layer_sparsity.
    macs_exponent: float = 0.0
    # scope=global: no layer under the one threshold loses more than this fraction of its weights; the
    # threshold takes the rest from the others. 1: no ceiling.
    max_layer_sparsity: float = 1.0
    # Masks that can regrow (RigL): at every `frequency` from the first cut until `regrow_until` (a
    # time in `unit`s, >= the schedule's end) the smallest `regrow_fraction` of each layer's live
    # weights (decaying on a cosine from the first cut to 0 then) give way to as many pruned ones with
    # the largest gradients. null: masks only grow.
    regrow_until: Optional[float] = None
    regrow_fraction: float = 0.3
    keep_first_dense: bool = True  # the first conv stays dense
    keep_last_dense: bool = True  # the classifier stays dense
    layers: Optional[str] = None  # regex (full match) over layer names that may be pruned; None: every conv/linear
    # Layer classes that may be pruned, by class name (Conv2d, Linear, or a subclass of either by its own
    # name: a layer is taken when any class it inherits from is named); empty: every conv/linear.
    types: List[str] = field(default_factory=list)
    # Per-layer final sparsity: exact layer name or regex (full match) -> fraction. Exact
    # names win over regexes; among regexes the later one wins.
    overrides: Dict[str, float] = field(default_factory=dict)
    overrides_file: Optional[str] = None  # YAML with an `overrides:` mapping (e.g. sensitivity_overrides.yaml)
    # Sensitivity study (experiment=sensitivity): prune one layer at a time to each of these
    # sparsities, without retraining, and record test accuracy. Empty: no study.
    sensitivity: List[float] = field(default_factory=list)
    sensitivity_tolerance: float = 0.01  # accuracy drop (fraction; 0.01 = 1 point) a derived override may cost


def prunes(p: PruneConfig) -> bool:
    """Whether ``p`` prunes anything. A method with every target at 0 (``prune.final_sparsity=0``,
    the dense point of a sparsity sweep) is the same as ``prune=none``."""
    targets = [p.final_sparsity, *p.overrides.values(), *load_overrides_file(p.overrides_file).values()]
    return p.method != "none" and any(t > 0 for t in targets)


def schedule_end(p: PruneConfig, regrow: bool = True) -> Tuple[str, float]:
    """The key and value (in ``unit``s) of the last mask event of ``p``'s schedule (``regrow=False``:
    of its pruning alone)."""
    if regrow and p.regrow_until is not None:
        return "prune.regrow_until", p.regrow_until
    return ("prune.start", p.start) if p.method == "oneshot" else ("prune.end", p.end)


def validate_prune(p: PruneConfig, finetune_epochs: Optional[int] = None) -> None:
    """Check ``p`` (a PruneConfig); ``finetune_epochs`` lets epoch schedules be checked against the phase."""
    require(p.method in METHODS, "prune.method", p.method, "one of " + ", ".join(METHODS))
    require(p.unit in UNITS, "prune.unit", p.unit, "one of " + ", ".join(UNITS))
    require(p.scope in ("layer", "global"), "prune.scope", p.scope, "layer or global")
    require(0 <= p.macs_exponent <= 2, "prune.macs_exponent", p.macs_exponent, "a number in [0, 2]")
    require(
        p.scope == "global" or p.macs_exponent == 0,
        "prune.macs_exponent",
        p.macs_exponent,
        "0 with prune.scope=layer (it weighs layers against each other under one threshold: prune.scope=global)",
    )
    for key in ("initial_sparsity", "final_sparsity"):
        value = getattr(p, key)
        require(0 <= value < 1, f"prune.{key}", value, "a fraction in [0, 1)")
    require(
        p.final_sparsity >= p.initial_sparsity,
        "prune.final_sparsity",
        p.final_sparsity,
        f"a fraction >= prune.initial_sparsity ({p.initial_sparsity})",
    )
    require(0 < p.max_layer_sparsity <= 1, "prune.max_layer_sparsity", p.max_layer_sparsity, "a fraction in (0, 1]")
    require(
        p.scope == "global" or p.max_layer_sparsity == 1,
        "prune.max_layer_sparsity",
        p.max_layer_sparsity,
        "1 with prune.scope=layer (a ceiling for the layers under one threshold: prune.scope=global)",
    )
    require(
        p.max_layer_sparsity > p.final_sparsity,
        "prune.max_layer_sparsity",
        p.max_layer_sparsity,
        f"above prune.final_sparsity ({p.final_sparsity}): at it every layer is at the target, which is "
        "prune.scope=layer",
    )
    require(p.start >= 0, "prune.start", p.start, "a number >= 0")
    if p.method in ("agp", "iterative"):  # oneshot has no end
        require(p.end >= p.start, "prune.end", p.end, f"a number >= prune.start ({p.start})")
    if p.method == "iterative" and p.rounds > 1:
        require(
            p.end > p.start,
            "prune.end",
            p.end,
            f"a number > prune.start ({p.start}) so that "
            f"prune.rounds={p.rounds} rounds can be spread over [start, end]",
        )
    require(p.frequency > 0, "prune.frequency", p.frequency, "a number > 0")
    if p.unit == "fraction":
        for key in ("start", "end", "frequency", "regrow_until"):
            value = getattr(p, key)
            require(
                value is None or value <= 1,
                f"prune.{key}",
                value,
                "a fraction of the finetune phase in [0, 1] with prune.unit=fraction",
            )
    require(0 < p.regrow_fraction < 1, "prune.regrow_fraction", p.regrow_fraction, "a fraction in (0, 1)")
    if p.regrow_until is not None:
        key, last = schedule_end(p, regrow=False)
        require(
            p.regrow_until >= last,
            "prune.regrow_until",
            p.regrow_until,
            f"null or a time >= {key} ({last}): masks regrow from the schedule's first cut until then",
        )
    require(p.rounds >= 1, "prune.rounds", p.rounds, "an integer >= 1")
    for pattern, value in p.overrides.items():
        require(0 <= value < 1, f"prune.overrides.{pattern}", value, "a fraction in [0, 1)")
    for name in p.types:
        require(
            isinstance(name, str) and name.isidentifier(),
            "prune.types",
            list(p.types),
            "a list of layer class names such as [Conv2d] or [Linear]",
        )
    for key, pattern in [("prune.layers", p.layers)] + [(f"prune.overrides.{k}", k) for k in p.overrides]:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"{key}: {pattern!r} is not a valid regular expression ({e})") from None
    load_overrides_file(p.overrides_file)  # a missing or malformed file is refused here, before any training
    if finetune_epochs and prunes(p) and p.unit == "epoch":
        key, last = schedule_end(p)
        require(
            last <= finetune_epochs,
            key,
            last,
            f"at most trainer.finetune_epochs ({finetune_epochs}): the "
            f"schedule must finish inside the finetune phase (raise trainer.finetune_epochs or lower {key})",
        )
    for value in p.sensitivity:
        require(0 < value < 1, "prune.sensitivity", list(p.sensitivity), "a list of fractions in (0, 1)")
    require(p.sensitivity_tolerance >= 0, "prune.sensitivity_tolerance", p.sensitivity_tolerance, "a fraction >= 0")


def load_overrides_file(path: Optional[str]) -> Dict[str, float]:
    """The ``overrides:`` mapping of ``prune.overrides_file`` (empty without a file)."""
    if not path:
        return {}
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(
            f"prune.overrides_file={path!r}: no such file (give a YAML file with an `overrides:` "
            "mapping, e.g. a run's sensitivity_overrides.yaml)"
        )
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"prune.overrides_file={path!r}: not valid YAML ({str(e).splitlines()[0]})") from None
    overrides = data.get("overrides") if isinstance(data, dict) else None
    if not isinstance(overrides, dict):
        raise ConfigError(
            f"prune.overrides_file={path!r}: needs a top-level `overrides:` mapping of layer name "
            "(or regex) -> sparsity"
        )
    for name, value in overrides.items():
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1
        require(ok, f"prune.overrides_file: {name}", value, "a fraction in [0, 1)")
    return {str(k): float(v) for k, v in overrides.items()}
