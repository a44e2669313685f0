"""When masks change and how far: the agp, iterative and oneshot schedules in steps.

A schedule is a map ``{step: progress}``: after ``step`` optimizer steps of the finetune
phase, every layer is pruned to ``initial + (final - initial) * progress`` (progress in
[0, 1]). Before the first event nothing is pruned. With ``regrow_until`` the map also has an
event every ``frequency`` up to then, at the progress in force, where masks regrow. The map is
a pure function of the config and the phase length, so a resumed run replays exactly the same
events.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, Optional

from sparsebench.errors import ConfigError
from sparsebench.prune.config import schedule_end

if TYPE_CHECKING:  # annotations only: no import at run time
    from sparsebench.prune.config import PruneConfig


def to_steps(value: float, unit: str, steps_per_epoch: int, total_steps: int) -> int:
    """A schedule time in steps: ``unit`` epoch (0.5 = half an epoch), step, or fraction (of the
    finetune phase: 0.5 = its middle, whatever its length)."""
    if unit == "step":
        return int(value)
    per_unit = total_steps if unit == "fraction" else steps_per_epoch
    return int(math.floor(value * per_unit + 0.5))


def agp_progress(step: int, start: int, end: int) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t_end - t0))^3, as progress."""
    if end <= start:
        return 1.0
    t = min(max(step - start, 0), end - start) / (end - start)
    return 1.0 - (1.0 - t) ** 3


def build_schedule(cfg: PruneConfig, steps_per_epoch: int, total_steps: int) -> Dict[int, float]:
    """``{step: progress}`` for ``cfg`` (a PruneConfig) over a phase of ``total_steps`` steps."""
    start = to_steps(cfg.start, cfg.unit, steps_per_epoch, total_steps)
    end = to_steps(cfg.end, cfg.unit, steps_per_epoch, total_steps)
    every = max(1, to_steps(cfg.frequency, cfg.unit, steps_per_epoch, total_steps))
    if cfg.method == "oneshot":
        events = {start: 1.0}
    elif cfg.method == "iterative":
        # k rounds spread evenly over [start, end], each one k-th of the way to the final sparsity.
        k = cfg.rounds
        events = {start + int(round(i * (end - start) / max(k - 1, 1))): (i + 1) / k for i in range(k)}
    elif cfg.method == "agp":
        events = {s: agp_progress(s, start, end) for s in range(start, end, every)}
        events[end] = 1.0
    else:
        raise ValueError(f"no schedule for prune.method={cfg.method!r}")
    if cfg.regrow_until is not None:  # masks regrow every `frequency` from the first cut on, at the progress then
        until = to_steps(cfg.regrow_until, cfg.unit, steps_per_epoch, total_steps)
        ordered = dict(sorted(events.items()))
        events.update({s: progress_at(ordered, s) for s in range(min(events), until + 1, every) if s not in events})
    key, value = schedule_end(cfg)
    last = max(events)
    if last > total_steps:
        raise ConfigError(
            f"{key}={value!r} ({cfg.unit}s) is not allowed: the schedule ends at step {last} but the "
            f"finetune phase has only {total_steps} steps ({steps_per_epoch} per epoch); lower {key} "
            "or raise trainer.finetune_epochs"
        )
    return dict(sorted(events.items()))


def progress_at(schedule: Dict[int, float], step: int) -> Optional[float]:
    """The progress in force after ``step`` steps (None before the first event)."""
    done = [p for s, p in schedule.items() if s <= step]
    return done[-1] if done else None
