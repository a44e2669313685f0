"""The sweep's figures (matplotlib's Agg canvas, no display): accuracy and speedup against sparsity, the
accuracy-speedup Pareto front, per-layer speedup heatmaps, footprints and learning curves."""

from __future__ import annotations

import io
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from sparsebench.report.jobs import SPEEDUP, as_float, baseline_batch, finished, metric_keys, swept_keys, unique_labels

MAX_HEATMAPS = 6


@dataclass
class Section:
    title: str
    png: Optional[bytes] = None
    note: str = ""


def _figure(width: float = 7.0, height: float = 4.2) -> Any:
    # Late: matplotlib takes a second to import and only reports need it. Figure + Agg canvas: no pyplot
    # state, no display needed.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _plain_log_labels(axis: Any) -> None:
    """Plain major labels ("2", "0.5") and no minor labels on a log axis: readable, and fast to lay out."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # late, as in _figure

    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 0.1 0.2 0.5 1 2 5: labels even on a short range
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _bits_label(row: Dict[str, Any], several_methods: bool) -> str:
    bits = int(as_float(row.get("bits")) or 32)
    if bits >= 32:
        return "fp32"
    return f"{bits}-bit {row['quant_method']}" if several_methods else f"{bits}-bit"


def _bits_groups(rows: Sequence[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    several = len({r["quant_method"] for r in rows if r["quant_method"] != "none"}) > 1
    groups: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: -(as_float(r.get("bits")) or 32)):
        groups[_bits_label(r, several)].append(r)
    return groups


def _mean_line(ax: Any, rows: Sequence[Dict[str, Any]], x: str, y: str, label: str, marker: str = "o") -> None:
    """Every job as a point, one line through the mean at each x (repeats, e.g. seeds, average)."""
    by_x: Dict[float, List[float]] = defaultdict(list)
    for r in rows:
        by_x[as_float(r[x])].append(as_float(r[y]))
    xs = sorted(by_x)
    line = ax.plot(xs, [sum(by_x[v]) / len(by_x[v]) for v in xs], marker=marker, label=label)[0]
    ax.scatter([as_float(r[x]) for r in rows], [as_float(r[y]) for r in rows], s=14, alpha=0.5, color=line.get_color())


def plot_accuracy(rows: Sequence[Dict[str, Any]]) -> Section:
    title = "Accuracy vs sparsity, per bit-width"
    ok = finished(rows, "sparsity", "acc_final")
    if not ok:
        return Section(title, note="No finished job reported acc_final and sparsity.")
    fig = _figure()
    ax = fig.add_subplot()
    for label, group in _bits_groups(ok).items():
        _mean_line(ax, group, "sparsity", "acc_final", label)
    dense = [as_float(r.get("acc_dense")) for r in ok if as_float(r.get("acc_dense")) is not None]
    if dense:
        ax.axhline(sum(dense) / len(dense), color="gray", ls="--", lw=1, label="dense (mean)")
    ax.set_xlabel("sparsity (fraction of zero weights in prunable layers)")
    ax.set_ylabel("test accuracy after compression")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return Section(title, _png(fig))


def plot_speedups(rows: Sequence[Dict[str, Any]]) -> Section:
    title = "Whole-network speedup vs sparsity, per baseline"
    keys = metric_keys(rows, SPEEDUP)
    ok = [r for r in finished(rows, "sparsity") if any(as_float(r.get(k)) is not None for k in keys)]
    if not ok:
        return Section(
            title,
            note="No job measured speedups (metrics speedup/<baseline>/b<batch>): run with "
            "bench.enabled=true and a backend on a GPU to fill this plot.",
        )
    baselines = sorted({SPEEDUP.match(k)["baseline"] for k in keys})
    fig = _figure(width=min(4.2 * len(baselines), 12.6), height=4.2)
    axes = fig.subplots(1, len(baselines), squeeze=False)[0]
    for ax, baseline in zip(axes, baselines):
        for key in (k for k in keys if SPEEDUP.match(k)["baseline"] == baseline):
            batch = SPEEDUP.match(key)["batch"]
            for label, group in _bits_groups(finished(ok, key)).items():
                _mean_line(ax, group, "sparsity", key, f"{label}, batch {batch}")
        ax.axhline(1.0, color="gray", ls="--", lw=1)
        ax.set_yscale("log")
        _plain_log_labels(ax.yaxis)
        ax.set_title(f"vs {baseline}", fontsize=10)
        ax.set_xlabel("sparsity")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("speedup (x, log scale; >1 is faster)")
    return Section(title, _png(fig))


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the points no other point beats on both axes (higher is better), by x."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(x2 >= x and y2 >= y and (x2 > x or y2 > y) for x2, y2 in points)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def primary_speedup(rows: Sequence[Dict[str, Any]]) -> Optional[str]:
    """The speedup key most finished jobs have; ties go to the smallest batch, then the baseline name."""
    counts = Counter(k for r in finished(rows) for k in r if SPEEDUP.match(k) and as_float(r.get(k)) is not None)
    if not counts:
        return None
    return min(counts, key=lambda k: (-counts[k], baseline_batch(k)[1], baseline_batch(k)[0]))


def plot_pareto(rows: Sequence[Dict[str, Any]], labels: Dict[int, str]) -> Section:
    key = primary_speedup(rows)
    x_key, x_name = (
        (key, f"speedup {key.split('/', 1)[1]} (x)")
        if key
        else ("compression", "compression (x, dense fp32 bytes / packed bytes)")
    )
    title = f"Accuracy-{'speedup' if key else 'compression'} Pareto front"
    ok = finished(rows, x_key, "acc_final")
    if not ok:
        return Section(title, note="No finished job has acc_final and a speedup or compression.")
    points = [(as_float(r[x_key]), as_float(r["acc_final"])) for r in ok]
    front = pareto_front(points)
    # The front's points are numbered and named in a key under the axes (labels beside the points overlap),
    # the figure as wide as its longest line (7 pt: about 0.05 inch a character).
    names = [f"{n}: {labels[id(ok[i])]}" for n, i in enumerate(front, 1)]
    key_height = 0.15 * len(front) + 0.1
    fig = _figure(width=max(7.0, 0.6 + 0.05 * max(map(len, names))), height=4.2 + key_height)
    ax, key_ax = fig.subplots(2, 1, height_ratios=[4.2, key_height])
    for label, group in _bits_groups(ok).items():
        ax.scatter([as_float(r[x_key]) for r in group], [as_float(r["acc_final"]) for r in group], s=28, label=label)
    ax.step(
        [points[i][0] for i in front],
        [points[i][1] for i in front],
        where="post",
        color="black",
        lw=1,
        label="Pareto front",
    )
    for n, i in enumerate(front, 1):
        ax.annotate(str(n), points[i], fontsize=8, xytext=(3, 3), textcoords="offset points")
    key_ax.axis("off")
    key_ax.text(0, 1, "\n".join(names), fontsize=7, va="top", transform=key_ax.transAxes)
    ax.set_xscale("log")
    _plain_log_labels(ax.xaxis)
    ax.set_xlabel(x_name + ", log scale")
    ax.set_ylabel("test accuracy after compression")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    note = "" if key else "No job measured speedups, so compression stands in for speed."
    return Section(title, _png(fig), note)


def plot_layer_heatmaps(rows: Sequence[Dict[str, Any]], labels: Dict[int, str]) -> List[Section]:
    title = "Per-layer speedup"
    per_case: Dict[Tuple[str, str, int], Dict[str, Dict[str, float]]] = defaultdict(dict)
    for r in finished(rows):
        for case, layer_values in r.get("_layers", {}).items():
            per_case[case][labels[id(r)]] = layer_values
    if not per_case:
        return [Section(title, note="No layers.csv has speedup_vs_<baseline> columns (no benchmark ran).")]
    cases = sorted(per_case, key=lambda c: (c[2], c[1], c[0]))
    sections = [
        _heatmap(f"{title}: {backend} vs {baseline}, batch {batch}", per_case[(backend, baseline, batch)])
        for backend, baseline, batch in cases[:MAX_HEATMAPS]
    ]
    if len(cases) > MAX_HEATMAPS:
        sections[
            -1
        ].note = f"{len(cases) - MAX_HEATMAPS} more backend/baseline/batch cases are in each job's layers.csv."
    return sections


def _heatmap(title: str, jobs: Dict[str, Dict[str, float]]) -> Section:
    from matplotlib.colors import TwoSlopeNorm  # late, as in _figure

    layers: List[str] = []
    for values in jobs.values():
        layers += [name for name in values if name not in layers]
    labels = list(jobs)
    grid = [[jobs[j].get(name, math.nan) for j in labels] for name in layers]
    logs = [[math.log2(v) if v and v > 0 else math.nan for v in line] for line in grid]
    finite = [abs(v) for line in logs for v in line if not math.isnan(v)] or [1.0]
    span = max(max(finite), 0.5)
    fig = _figure(width=min(2.5 + 0.9 * len(labels), 12.6), height=1.6 + 0.32 * len(layers))
    ax = fig.add_subplot()
    image = ax.imshow(logs, cmap="RdBu", norm=TwoSlopeNorm(vcenter=0, vmin=-span, vmax=span), aspect="auto")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), layers, fontsize=8)
    if len(labels) * len(layers) <= 400:
        for i, line in enumerate(grid):
            for j, v in enumerate(line):
                if not math.isnan(v):  # white on the dark ends of the colour map
                    dark = abs(logs[i][j]) > 0.6 * span
                    ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("log2(speedup)")
    return Section(
        title,
        _png(fig),
        "Each cell: the layer's speedup of the sparse backend over the baseline "
        "(blue: faster, red: slower; white: equal).",
    )


def plot_footprint(rows: Sequence[Dict[str, Any]], labels: Dict[int, str]) -> Section:
    title = "Weight footprint"
    ok = finished(rows, "footprint_bytes")
    if not ok:
        return Section(title, note="No finished job reported footprint_bytes.")
    names = [labels[id(r)] for r in ok]
    # Room for the longest label at 8 pt (about 0.06 inch a character) beside a plot of 4 inches.
    fig = _figure(width=max(7.0, 4.0 + 0.06 * max(map(len, names))), height=1.4 + 0.3 * len(ok))
    ax = fig.add_subplot()
    ys = range(len(ok))
    dense = [(as_float(r.get("dense_bytes")) or 0) / 1024 for r in ok]
    packed = [as_float(r["footprint_bytes"]) / 1024 for r in ok]
    ax.barh(ys, dense, color="#d9d9d9", label="dense fp32")
    ax.barh(ys, packed, color="#4477aa", height=0.5, label="packed (values, indices, scales)")
    for y, r, width in zip(ys, ok, packed):
        if as_float(r.get("compression")) is not None:
            ax.text(width, y, f" {as_float(r['compression']):.1f}x", va="center", fontsize=7)
    ax.set_yticks(list(ys), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("KiB")
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.0), ncols=2, frameon=False)
    return Section(title, _png(fig))


def plot_curves(rows: Sequence[Dict[str, Any]], labels: Dict[int, str]) -> Section:
    title = "Test accuracy per epoch, dense training and retraining"
    per_job = {labels[id(r)]: r["_curves"] for r in rows if r.get("_curves")}
    if not per_job:
        return Section(
            title,
            note="No job wrote history.jsonl (runs log their per-epoch accuracy there, "
            "with or without W&B; older runs have none).",
        )
    # Many jobs: each legend goes under its plot, one line a job, and the figure grows to hold it.
    entries = max(
        sum((phase in c) + (f"{phase} ema" in c) for c in per_job.values()) for phase in ("dense", "finetune")
    )
    below = entries > 6
    fig = _figure(width=11.0, height=4.2 + (0.12 * entries if below else 0))
    axes = fig.subplots(1, 2)
    for ax, phase in zip(axes, ("dense", "finetune")):
        for label, curves in per_job.items():
            if phase in curves:
                (line,) = ax.plot(*zip(*curves[phase]), lw=1.2, label=label)
                if f"{phase} ema" in curves:  # the moving average, dashed in the job's colour
                    ax.plot(
                        *zip(*curves[f"{phase} ema"]),
                        lw=1.2,
                        ls="--",
                        color=line.get_color(),
                        label=f"{label}, moving average",
                    )
        ax.set_title("dense training" if phase == "dense" else "retraining (pruning, QAT)", fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(
                fontsize=6, **({"loc": "upper left", "bbox_to_anchor": (0, -0.12), "frameon": False} if below else {})
            )
    axes[0].set_ylabel("test accuracy")
    return Section(title, _png(fig))


def sections(rows: Sequence[Dict[str, Any]]) -> List[Section]:
    labels = unique_labels(rows, swept_keys(rows))
    return [
        plot_accuracy(rows),
        plot_speedups(rows),
        plot_pareto(rows, labels),
        *plot_layer_heatmaps(rows, labels),
        plot_footprint(rows, labels),
        plot_curves(rows, labels),
    ]
