"""Sensitivity study (``experiment=sensitivity``): prune one layer at a time to each listed
sparsity, without retraining, and record validation accuracy (data.val_fraction).

Writes into the run directory: ``sensitivity.csv`` (one row per layer, one column per
sparsity), ``sensitivity.png`` (accuracy vs sparsity, a line per layer) and
``sensitivity_overrides.yaml``, a per-layer override file for ``prune.overrides_file``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List

import torch
import yaml
from torch import nn

from sparsebench.prune.masks import magnitude_mask, weight_param
from sparsebench.prune.selection import prunable_layers
from sparsebench.rundir import atomic_write_bytes, write_csv

if TYPE_CHECKING:  # annotations only: no import at run time
    from sparsebench.prune.config import PruneConfig


def sensitivity_study(
    cfg: PruneConfig,
    model: nn.Module,
    evaluate: Callable[[], float],
    acc_dense: float,
    run_dir: Path,
    tracker: Any = None,
) -> Dict[str, Dict[float, float]]:
    """Run the study for ``cfg`` (a PruneConfig) on ``model`` and write its three files.

    ``evaluate()`` returns the current validation accuracy (a fraction). The model's weights are
    restored exactly after every trial. Returns ``{layer: {sparsity: accuracy}}``.
    """
    levels = sorted({float(s) for s in cfg.sensitivity})
    layers = prunable_layers(model, cfg)
    table: Dict[str, Dict[float, float]] = {}
    for name, module in layers.items():
        weight = weight_param(module)
        original = weight.detach().clone()
        table[name] = {}
        for level in levels:
            with torch.no_grad():
                weight.masked_fill_(~magnitude_mask(original, level), 0.0)
            table[name][level] = evaluate()
            with torch.no_grad():
                weight.copy_(original)
    tolerance = float(cfg.sensitivity_tolerance)
    safe = {name: safe_sparsity(accs, acc_dense, tolerance) for name, accs in table.items()}
    rows = [
        {
            "layer": name,
            "params": weight_param(layers[name]).numel(),
            "acc_dense": acc_dense,
            **{f"{level:g}": acc for level, acc in accs.items()},
            "safe_sparsity": safe[name],
        }
        for name, accs in table.items()
    ]
    run_dir = Path(run_dir)
    write_csv(run_dir / "sensitivity.csv", rows)
    atomic_write_bytes(run_dir / "sensitivity.png", plot_png(table, acc_dense, tolerance))
    atomic_write_bytes(run_dir / "sensitivity_overrides.yaml", overrides_yaml(safe, tolerance).encode())
    if tracker is not None:
        tracker.table("sensitivity", rows)
    return table


def safe_sparsity(accs: Dict[float, float], acc_dense: float, tolerance: float) -> float:
    """The highest sparsity reached while every level up to it costs <= ``tolerance``
    accuracy (0.0, i.e. keep dense, when even the lowest level costs more)."""
    best = 0.0
    for level in sorted(accs):
        if acc_dense - accs[level] > tolerance + 1e-9:
            break
        best = level
    return best


def overrides_yaml(safe: Dict[str, float], tolerance: float) -> str:
    header = (
        f"# Per-layer final sparsity from sensitivity.csv: the highest sparsity that cost at most "
        f"{100 * tolerance:g} point(s)\n# of validation accuracy when that layer alone was pruned (no retraining).\n"
        "# Use: prune=agp prune.overrides_file=<this file>\n"
    )
    return header + yaml.safe_dump({"overrides": {n: float(s) for n, s in safe.items()}}, sort_keys=False)


def plot_png(table: Dict[str, Dict[float, float]], acc_dense: float, tolerance: float) -> bytes:
    """Accuracy (%) vs sparsity, one line per layer, as PNG bytes (Agg, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # late: only the sensitivity study plots
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, accs in table.items():
        levels: List[float] = sorted(accs)
        ax.plot([100 * s for s in levels], [100 * accs[s] for s in levels], marker="o", label=name)
    ax.axhline(100 * acc_dense, color="black", linestyle="--", linewidth=1, label="dense")
    ax.axhline(
        100 * (acc_dense - tolerance), color="grey", linestyle=":", linewidth=1, label=f"dense - {100 * tolerance:g} pt"
    )
    ax.set_xlabel("sparsity of the one pruned layer (%)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Pruning sensitivity, one layer at a time (no retraining)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
