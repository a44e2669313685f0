"""``sparsebench-report DIR``: one sweep -> ``DIR/summary.csv`` and a self-contained ``DIR/report.html``.

A sweep directory (``multirun/<name>/<time>``) holds one subfolder per job with Hydra's
``.hydra/`` and, once the job ended, ``metrics.json`` (+ ``layers.csv``). A job without
metrics.json died before it could write one (killed, out of memory) and counts as failed.
Plots are PNGs made with matplotlib's Agg canvas and inlined as base64, so the page needs
no other file and no network.
"""

from __future__ import annotations

import argparse
import base64
import csv
import functools
import html
import io
import json
import math
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

from sparsebench.quant.config import method_reads
from sparsebench.track import atomic_write_bytes, atomic_write_text, write_csv

SPEEDUP = re.compile(r"^speedup/(?P<baseline>[^/]+)/b(?P<batch>\d+)$")
FASTER = re.compile(r"^faster/(?P<baseline>[^/]+)/b(?P<batch>\d+)$")  # "W of L" layers, from layers.csv
LAYER_SPEEDUP = "speedup_vs_"
DIED = "no metrics.json: the job died before it finished (killed, out of memory, or still running)"
# Leading summary.csv columns, in this order; speedup columns and the swept keys follow.
COLUMNS = ["num", "job", "status", "overrides", "method", "prune_method", "quant_method", "target_sparsity",
           "sparsity", "bits", "acc_dense", "acc_final", "dense_bytes", "footprint_bytes", "compression",
           "macs_kept", "runtime_s", "backend", "noisy_timings"]
# metrics.json keys copied as they are.
MEASURED = ("sparsity", "acc_dense", "acc_final", "dense_bytes", "footprint_bytes", "compression", "macs_kept",
            "runtime_s")
MAX_HEATMAPS = 6
GLOBAL_SCOPE_KEYS = ("prune.macs_exponent", "prune.max_layer_sparsity")  # read only under one threshold


# ---------------------------------------------------------------- reading a sweep


def job_dirs(sweep_dir: Path) -> List[Path]:
    """The job folders of a sweep (Hydra's, with .hydra/; or a shared dense run, with metrics.json).

    Reference runs without a job number (``dense-<key>``) come first, then jobs by number; a
    run directory given on its own is its one job.
    """
    subs = [p for p in Path(sweep_dir).iterdir()
            if p.is_dir() and ((p / ".hydra").is_dir() or (p / "metrics.json").is_file())]
    if not subs and (Path(sweep_dir) / ".hydra").is_dir():
        subs = [Path(sweep_dir)]
    nums = {p: _job_num(p, _hydra_yaml(p)) for p in subs}
    return sorted(subs, key=lambda p: (nums[p] is not None, nums[p] or 0, p.name))


def _hydra_yaml(job_dir: Path) -> Any:
    return _load_yaml(job_dir / ".hydra" / "hydra.yaml")


def _job_num(job_dir: Path, hydra: Any) -> Optional[int]:
    """Hydra's job number, from the job's .hydra/hydra.yaml (``hydra.sweep.subdir`` may name the
    folders anything), else from Hydra's default folder name ``N_<overrides>``."""
    num = _dig(hydra, "hydra.job.num") if _dig(hydra, "hydra.mode") == "MULTIRUN" else None
    if isinstance(num, int):
        return num
    head = job_dir.name.split("_", 1)[0]
    return int(head) if head.isdigit() else None


def _load_yaml(path: Path) -> Any:
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.exists() else None
    except Exception:  # a half-written or hand-edited file: treat as absent
        return None


def _load_metrics(path: Path) -> Optional[Dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _dig(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


def split_override(override: str) -> Tuple[str, Any]:
    """An override's key and its value, read as _one_spelling reads it."""
    key, _, value = override.partition("=")
    return key.lstrip("+~"), _one_spelling(value)


def read_job(job_dir: Path) -> Dict[str, Any]:
    """One summary row: what the job was (overrides, config) and what it measured (metrics.json)."""
    overrides = _load_yaml(job_dir / ".hydra" / "overrides.yaml") or []
    config = _load_yaml(job_dir / ".hydra" / "config.yaml") or (_load_metrics(job_dir / "manifest.json") or {}).get("config", {})
    metrics = _load_metrics(job_dir / "metrics.json")
    hydra = _hydra_yaml(job_dir)
    prune_method = _dig(config, "prune.method") or "none"
    if not (_dig(config, "prune.final_sparsity") or _dig(config, "prune.overrides") or _dig(config, "prune.overrides_file")):
        prune_method = "none"  # every target 0: the dense point of a sparsity sweep
    quant_method = _dig(config, "quant.method") or "none"
    methods = [m for m in (prune_method, quant_method) if m != "none"]
    row: Dict[str, Any] = {
        "num": _job_num(job_dir, hydra),
        "job": job_dir.name,
        "status": "failed",
        "overrides": " ".join(str(o) for o in overrides),
        "_overrides": [str(o) for o in overrides],  # the list, for values that hold spaces
        "method": "+".join(methods) or "dense",
        "prune_method": prune_method,
        "quant_method": quant_method,
        # prune=none keeps any final_sparsity an experiment file set: the target is then 0.
        "target_sparsity": _dig(config, "prune.final_sparsity") if prune_method != "none" else 0.0,
        "bits": _dig(config, "quant.bits"),
    }
    # For a swept key this job did not set (an experiment file did, or another sweep in the folder swept it).
    row["_config"] = config
    row["_choices"] = _dig(hydra, "hydra.runtime.choices") or {}
    row["_curves"] = read_curves(job_dir)  # a job that died may still have logged its epochs
    if metrics is None:
        row["error"] = DIED
        return row
    row["status"] = "ok" if metrics.get("status") == "ok" else "failed"
    row["bits"] = metrics.get("weight_bits", row["bits"])
    row.update({k: metrics[k] for k in MEASURED if k in metrics})
    row["backend"] = metrics.get("bench/backend")  # the sparse backend the speedups are of
    row["noisy_timings"] = metrics.get("bench/noisy") or ""  # "<backend>/b<batch>, ...": timed beside other GPU work
    row.update({k: v for k, v in metrics.items() if SPEEDUP.match(k)})
    row["_layers"] = read_layer_speedups(job_dir, row["backend"])  # for the counts below and the heatmaps
    if row["backend"]:  # the sparse backend's layers only (not baselines compared with each other)
        for (_, baseline, batch), layers in row["_layers"].items():
            row[f"faster/{baseline}/b{batch}"] = f"{sum(v > 1 for v in layers.values())} of {len(layers)}"
    if metrics.get("error"):
        row["error"] = metrics["error"]
    return row


def _value_not_overridden(row: Dict[str, Any], key: str) -> Any:
    """What a job ran for a swept key its overrides do not name: a config group's choice, else a
    plain config value (None for a subtree, which no table cell can show; "" where the job's config
    has no such key: it ran before the key existed)."""
    if key in row["_choices"]:
        return row["_choices"][key]
    parent, _, leaf = key.rpartition(".")
    holder = _dig(row["_config"], parent) if parent else row["_config"]
    if not isinstance(holder, dict) or leaf not in holder:
        return ""
    value = holder[leaf]
    return None if isinstance(value, (dict, list)) else value


def collect(sweep_dir: Path) -> List[Dict[str, Any]]:
    """Every job of the sweep as a summary row, in order of the swept values; the keys that differ between
    jobs get their own column."""
    rows = [read_job(d) for d in job_dirs(Path(sweep_dir))]
    swept = swept_keys(rows)
    for row in rows:
        values = dict(split_override(o) for o in row["_overrides"])
        row.update({k: values[k] if k in values else _one_spelling(_value_not_overridden(row, k)) for k in swept})
    return sorted(rows, key=lambda r: _row_order(r, swept))


def _row_order(row: Dict[str, Any], swept: Sequence[str]) -> Tuple[Any, ...]:
    """Where a job goes in summary.csv, table.md and the plots: the shared dense model first, then by the
    swept values, numbers as numbers (several sweeps sharing a folder number their jobs from 0 each, so
    job order would interleave them); a key the job does not read sorts first; ties keep job order."""
    def value(key: str) -> Tuple[Any, ...]:
        v = row.get(key) if applies(row, key) else None
        return (0,) if v is None or v == "" else (1, _num(v)) if _num(v) is not None else (2, str(v))
    return (not _shared_dense(row),) + tuple(value(k) for k in swept)


@functools.lru_cache(maxsize=1)
def _override_parser() -> OverridesParser:
    return OverridesParser.create()


def _one_spelling(value: Any) -> Any:
    """A swept value typed as Hydra reads an override, whole floats as ints: an override's "50" and
    "true" and a config's 30.0 and True read 50, True, 30 and True."""
    if isinstance(value, str):
        try:
            value = _override_parser().parse_override(f"key={value}").value()
        except HydraException:  # not a value Hydra would parse: shown as written
            return value
    return int(value) if isinstance(value, float) and value.is_integer() else value


def swept_keys(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """Override keys whose value is not the same in every numbered job (in first-seen order)."""
    jobs = [r for r in rows if r.get("num") is not None] or rows  # not the shared dense reference
    per_job = [dict(split_override(o) for o in row["_overrides"]) for row in jobs]
    keys: List[str] = []
    for values in per_job:
        keys += [k for k in values if k not in keys]
    seen = {k: {repr(values.get(k)) for values in per_job} for k in keys}
    return [k for k, v in seen.items() if len(v) > 1]


def applies(row: Dict[str, Any], key: str) -> bool:
    """Whether a swept key meant anything to this job. Tables and plots leave it blank where it did not
    (quant.kmeans_per_channel on a linear or fp32 job, prune.scope on an unpruned one, prune.macs_exponent
    and prune.max_layer_sparsity with prune.scope=layer); summary.csv keeps what every job's config held."""
    group, _, name = key.partition(".")
    if group == "quant" and name:
        return method_reads(row["quant_method"], name)
    if key in GLOBAL_SCOPE_KEYS:
        return row["prune_method"] != "none" and _dig(row.get("_config"), "prune.scope") == "global"
    if group == "prune" and name not in ("", "method", "final_sparsity"):
        return row["prune_method"] != "none"
    return True


def summary_columns(rows: Sequence[Dict[str, Any]]) -> List[str]:
    swept = swept_keys(rows)
    return COLUMNS[:4] + swept + COLUMNS[4:] + _keys(rows, SPEEDUP) + _keys(rows, FASTER) + ["error"]


def _keys(rows: Sequence[Dict[str, Any]], pattern: "re.Pattern[str]") -> List[str]:
    """The rows' keys matching ``pattern`` (<kind>/<baseline>/b<batch>), by baseline, then batch."""
    return sorted({k for r in rows for k in r if pattern.match(k)}, key=_baseline_batch)


def write_summary(path: Path, rows: Sequence[Dict[str, Any]]) -> None:
    columns = summary_columns(rows)
    write_csv(path, [{c: row.get(c) for c in columns} for row in rows])


def _baseline_batch(key: str) -> Tuple[str, int]:
    m = SPEEDUP.match(key) or FASTER.match(key)
    return (m["baseline"], int(m["batch"])) if m else (key, 0)


def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The finished jobs as a Markdown table for docs: the swept values, top-1 and its change from
    dense, footprint and compression, the multiply-adds the weights keep, whole-network speedups and the
    layers faster than each baseline.
    The jobs left out (failed, died, still running) are named below it with their error. Columns are
    the keys that differ between the jobs shown: a key only the left-out jobs set gets none."""
    shown = _ok(rows, "acc_final")
    swept = swept_keys(shown)
    speedups, faster = _keys(rows, SPEEDUP), _keys(rows, FASTER)
    macs = any(_num(r.get("macs_kept")) is not None for r in shown)  # jobs before macs_kept have none
    head = ([k.rsplit(".", 1)[-1] for k in swept] or ["job"]) + ["top-1", "Δ vs dense", "footprint", "compression"]
    head += ["MACs kept"] if macs else []
    head += [f"vs {SPEEDUP.match(k)['baseline']} b{SPEEDUP.match(k)['batch']}" for k in speedups]
    head += [f"layers faster than {FASTER.match(k)['baseline']} b{FASTER.match(k)['batch']}" for k in faster]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    marked = False
    def number(value: Any, fmt: str) -> str:
        return fmt.format(_num(value)) if _num(value) is not None else "—"

    labels = _table_labels(shown, swept)
    for r in shown:
        reference, label = _shared_dense(r), labels[id(r)]
        acc, dense = _num(r["acc_final"]), _num(r.get("acc_dense"))
        delta = f"{100 * (acc - dense):+.2f}" if dense is not None and not reference else "—"
        megabytes = _num(r.get("footprint_bytes")) / 1e6 if _num(r.get("footprint_bytes")) is not None else None
        cells = label + [f"{100 * acc:.2f}%", delta, number(megabytes, "{:.3f} MB"), number(r.get("compression"), "{:.1f}x")]
        cells += [number(r.get("macs_kept"), "{:.1%}")] if macs else []
        noisy = set(filter(None, r.get("noisy_timings", "").split(", ")))
        for k in speedups:
            baseline, batch = _baseline_batch(k)
            mark = " (noisy)" if noisy & {f"{baseline}/b{batch}", f"{r.get('backend')}/b{batch}"} and r.get(k) else ""
            marked = marked or bool(mark)
            cells.append(number(r.get(k), "{:.2f}x") + mark)
        cells += [str(r.get(k) or "—") for k in faster]
        lines.append("| " + " | ".join(cells) + " |")
    shown_ids = {id(r) for r in shown}
    left_out = [r for r in rows if id(r) not in shown_ids]
    if left_out:
        lines += ["", f"Not in the table ({len(left_out)} of {len(rows)} jobs): " + "; ".join(
            f"`{r['job']}` ({_first_line(r.get('error') or 'no top-1')})" for r in left_out) + "."]
    if marked:
        lines += ["", "(noisy): one of the two timings spread by more than a tenth of its median (`bench/noisy` in "
                      "the job's metrics.json): something else used the GPU while it was measured."]
    return "\n".join(lines) + "\n"


def _table_labels(rows: Sequence[Dict[str, Any]], swept: Sequence[str]) -> Dict[int, List[str]]:
    """Each row's label cells by id(row): the swept values it reads ("dense" for the sweep's shared
    dense model). Rows that would read alike (they differ only in keys neither reads) end with their job."""
    labels: Dict[int, List[str]] = {}
    for r in rows:
        labels[id(r)] = ([_spelled(r.get(k)) if applies(r, k) else "" for k in swept] if not _shared_dense(r)
                         else ["dense"] + [""] * (len(swept) - 1)) or [r["job"]]
    repeated = {label for label, n in Counter(tuple(v) for v in labels.values()).items() if n > 1}
    for r in rows:
        label = labels[id(r)]
        if tuple(label) in repeated:
            label[-1] = f"{label[-1]} ({_job_name(r)})".lstrip()
    return labels


def _shared_dense(row: Dict[str, Any]) -> bool:
    """The sweep's shared dense model (trainer.init_from=shared), not one of its jobs."""
    return row["job"].startswith("dense-")


def _first_line(error: Any) -> str:
    """An error's first non-empty line, as Markdown code (an error may hold <...> that HTML would eat)."""
    line = next((part for part in str(error).splitlines() if part.strip()), "")
    return "`" + line.replace("`", "'") + "`"


def _spelled(value: Any) -> str:
    """A swept value as an override would spell it (null, not Python's None)."""
    return "null" if value is None else str(value)


# ---------------------------------------------------------------- plots


@dataclass
class Section:
    title: str
    png: Optional[bytes] = None
    note: str = ""


def _figure(width: float = 7.0, height: float = 4.2) -> Any:
    from matplotlib.figure import Figure  # Figure + Agg canvas: no pyplot state, no display needed

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _plain_log_labels(axis: Any) -> None:
    """Plain major labels ("2", "0.5") and no minor labels on a log axis: readable, and fast to lay out."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 0.1 0.2 0.5 1 2 5: labels even on a short range
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _num(value: Any) -> Optional[float]:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _ok(rows: Iterable[Dict[str, Any]], *keys: str) -> List[Dict[str, Any]]:
    return [r for r in rows if r["status"] == "ok" and all(_num(r.get(k)) is not None for k in keys)]


def job_label(row: Dict[str, Any], swept: Sequence[str]) -> str:
    """Short name for plots: the swept values ("final_sparsity=0.9 bits=4"), else the job number."""
    parts = [f"{k.rsplit('.', 1)[-1]}={row.get(k)}" for k in swept if row.get(k) is not None and applies(row, k)]
    if row.get("num") is None:
        return row["job"]  # a reference run such as dense-<key>
    return " ".join(parts) or f"job {row['num']}"


def unique_labels(rows: Sequence[Dict[str, Any]], swept: Sequence[str]) -> Dict[int, str]:
    """Each row's job_label by id(row); a label two jobs share (they differ only in keys neither
    reads) adds the job's number (else its folder), so no plot keyed by label drops one."""
    labels = [job_label(r, swept) for r in rows]
    repeated = {label for label, n in Counter(labels).items() if n > 1}
    return {id(r): label if label not in repeated else f"{label} ({_job_name(r)})" for r, label in zip(rows, labels)}


def _job_name(row: Dict[str, Any]) -> str:
    return f"job {row['num']}" if row.get("num") is not None else row["job"]


def _bits_label(row: Dict[str, Any], several_methods: bool) -> str:
    bits = int(_num(row.get("bits")) or 32)
    if bits >= 32:
        return "fp32"
    return f"{bits}-bit {row['quant_method']}" if several_methods else f"{bits}-bit"


def _bits_groups(rows: Sequence[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    several = len({r["quant_method"] for r in rows if r["quant_method"] != "none"}) > 1
    groups: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: -(_num(r.get("bits")) or 32)):
        groups[_bits_label(r, several)].append(r)
    return groups


def _mean_line(ax: Any, rows: Sequence[Dict[str, Any]], x: str, y: str, label: str, marker: str = "o") -> None:
    """Every job as a point, one line through the mean at each x (repeats, e.g. seeds, average)."""
    by_x: Dict[float, List[float]] = defaultdict(list)
    for r in rows:
        by_x[_num(r[x])].append(_num(r[y]))
    xs = sorted(by_x)
    line = ax.plot(xs, [sum(by_x[v]) / len(by_x[v]) for v in xs], marker=marker, label=label)[0]
    ax.scatter([_num(r[x]) for r in rows], [_num(r[y]) for r in rows], s=14, alpha=0.5, color=line.get_color())


def plot_accuracy(rows: Sequence[Dict[str, Any]]) -> Section:
    title = "Accuracy vs sparsity, per bit-width"
    ok = _ok(rows, "sparsity", "acc_final")
    if not ok:
        return Section(title, note="No finished job reported acc_final and sparsity.")
    fig = _figure()
    ax = fig.add_subplot()
    for label, group in _bits_groups(ok).items():
        _mean_line(ax, group, "sparsity", "acc_final", label)
    dense = [_num(r.get("acc_dense")) for r in ok if _num(r.get("acc_dense")) is not None]
    if dense:
        ax.axhline(sum(dense) / len(dense), color="gray", ls="--", lw=1, label="dense (mean)")
    ax.set_xlabel("sparsity (fraction of zero weights in prunable layers)")
    ax.set_ylabel("test accuracy after compression")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return Section(title, _png(fig))


def plot_speedups(rows: Sequence[Dict[str, Any]]) -> Section:
    title = "Whole-network speedup vs sparsity, per baseline"
    keys = _keys(rows, SPEEDUP)
    ok = [r for r in _ok(rows, "sparsity") if any(_num(r.get(k)) is not None for k in keys)]
    if not ok:
        return Section(title, note="No job measured speedups (metrics speedup/<baseline>/b<batch>): run with "
                                  "bench.enabled=true and a backend on a GPU to fill this plot.")
    baselines = sorted({SPEEDUP.match(k)["baseline"] for k in keys})
    fig = _figure(width=min(4.2 * len(baselines), 12.6), height=4.2)
    axes = fig.subplots(1, len(baselines), squeeze=False)[0]
    for ax, baseline in zip(axes, baselines):
        for key in (k for k in keys if SPEEDUP.match(k)["baseline"] == baseline):
            batch = SPEEDUP.match(key)["batch"]
            for label, group in _bits_groups(_ok(ok, key)).items():
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
    counts = Counter(k for r in _ok(rows) for k in r if SPEEDUP.match(k) and _num(r.get(k)) is not None)
    if not counts:
        return None
    return min(counts, key=lambda k: (-counts[k], _baseline_batch(k)[1], _baseline_batch(k)[0]))


def plot_pareto(rows: Sequence[Dict[str, Any]], labels: Dict[int, str]) -> Section:
    key = primary_speedup(rows)
    x_key, x_name = (key, f"speedup {key.split('/', 1)[1]} (x)") if key else ("compression", "compression (x, dense fp32 bytes / packed bytes)")
    title = f"Accuracy-{'speedup' if key else 'compression'} Pareto front"
    ok = _ok(rows, x_key, "acc_final")
    if not ok:
        return Section(title, note="No finished job has acc_final and a speedup or compression.")
    points = [(_num(r[x_key]), _num(r["acc_final"])) for r in ok]
    front = pareto_front(points)
    # The front's points are numbered and named in a key under the axes: labels beside the points overlap.
    key_height = 0.15 * len(front) + 0.1
    fig = _figure(height=4.2 + key_height)
    ax, key_ax = fig.subplots(2, 1, height_ratios=[4.2, key_height])
    for label, group in _bits_groups(ok).items():
        ax.scatter([_num(r[x_key]) for r in group], [_num(r["acc_final"]) for r in group], s=28, label=label)
    ax.step([points[i][0] for i in front], [points[i][1] for i in front], where="post", color="black", lw=1,
            label="Pareto front")
    for n, i in enumerate(front, 1):
        ax.annotate(str(n), points[i], fontsize=8, xytext=(3, 3), textcoords="offset points")
    key_ax.axis("off")
    key_ax.text(0, 1, "\n".join(f"{n}: {labels[id(ok[i])]}" for n, i in enumerate(front, 1)), fontsize=7,
                va="top", transform=key_ax.transAxes)
    ax.set_xscale("log")
    _plain_log_labels(ax.xaxis)
    ax.set_xlabel(x_name + ", log scale")
    ax.set_ylabel("test accuracy after compression")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    note = "" if key else "No job measured speedups, so compression stands in for speed."
    return Section(title, _png(fig), note)


def read_layer_speedups(job_dir: Path, backend: Optional[str] = None) -> Dict[Tuple[str, str, int], Dict[str, float]]:
    """layers.csv -> {(backend, baseline, batch): {layer: speedup}} from its speedup_vs_<baseline> columns.

    With ``backend`` given (the job's sparse backend), only its rows count, not baselines
    compared with each other.
    """
    path = job_dir / "layers.csv"
    out: Dict[Tuple[str, str, int], Dict[str, float]] = defaultdict(dict)
    if not path.exists():
        return out
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            for col, value in rec.items():
                if not (col or "").startswith(LAYER_SPEEDUP) or _num(value) is None:
                    continue
                baseline = col[len(LAYER_SPEEDUP):]
                row_backend = rec.get("backend") or "?"
                if row_backend == baseline or (backend and row_backend != backend):
                    continue
                batch = int(_num(rec.get("batch")) or 0)
                out[(row_backend, baseline, batch)][rec.get("layer", "?")] = _num(value)
    return out


def plot_layer_heatmaps(rows: Sequence[Dict[str, Any]], labels: Dict[int, str]) -> List[Section]:
    title = "Per-layer speedup"
    per_case: Dict[Tuple[str, str, int], Dict[str, Dict[str, float]]] = defaultdict(dict)
    for r in _ok(rows):
        for case, layer_values in r.get("_layers", {}).items():
            per_case[case][labels[id(r)]] = layer_values
    if not per_case:
        return [Section(title, note="No layers.csv has speedup_vs_<baseline> columns (no benchmark ran).")]
    cases = sorted(per_case, key=lambda c: (c[2], c[1], c[0]))
    sections = [_heatmap(f"{title}: {backend} vs {baseline}, batch {batch}", per_case[(backend, baseline, batch)])
                for backend, baseline, batch in cases[:MAX_HEATMAPS]]
    if len(cases) > MAX_HEATMAPS:
        sections[-1].note = f"{len(cases) - MAX_HEATMAPS} more backend/baseline/batch cases are in each job's layers.csv."
    return sections


def _heatmap(title: str, jobs: Dict[str, Dict[str, float]]) -> Section:
    from matplotlib.colors import TwoSlopeNorm

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
    return Section(title, _png(fig), "Each cell: the layer's speedup of the sparse backend over the baseline "
                                     "(blue: faster, red: slower; white: equal).")


def plot_footprint(rows: Sequence[Dict[str, Any]], labels: Dict[int, str]) -> Section:
    title = "Weight footprint"
    ok = _ok(rows, "footprint_bytes")
    if not ok:
        return Section(title, note="No finished job reported footprint_bytes.")
    names = [labels[id(r)] for r in ok]
    # Room for the longest label at 8 pt (about 0.06 inch a character) beside a plot of 4 inches.
    fig = _figure(width=max(7.0, 4.0 + 0.06 * max(map(len, names))), height=1.4 + 0.3 * len(ok))
    ax = fig.add_subplot()
    ys = range(len(ok))
    dense = [(_num(r.get("dense_bytes")) or 0) / 1024 for r in ok]
    packed = [_num(r["footprint_bytes"]) / 1024 for r in ok]
    ax.barh(ys, dense, color="#d9d9d9", label="dense fp32")
    ax.barh(ys, packed, color="#4477aa", height=0.5, label="packed (values, indices, scales)")
    for y, r, width in zip(ys, ok, packed):
        if _num(r.get("compression")) is not None:
            ax.text(width, y, f" {_num(r['compression']):.1f}x", va="center", fontsize=7)
    ax.set_yticks(list(ys), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("KiB")
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.0), ncols=2, frameon=False)
    return Section(title, _png(fig))


def read_curves(job_dir: Path) -> Dict[str, List[Tuple[float, float]]]:
    """history.jsonl -> {phase: [(epoch, test accuracy), ...]} for the dense and finetune phases.

    A phase that kept a moving average of its weights (trainer.ema_decay) also gives "<phase> ema".
    """
    curves: Dict[str, Dict[float, float]] = defaultdict(dict)
    path = job_dir / "history.jsonl"
    if not path.exists():
        return {}
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:  # a line cut short by a crash
            continue
        for phase in ("dense", "finetune"):
            epoch = _num(entry.get(f"{phase}/epoch"))
            for key, curve in (("acc", phase), ("acc_ema", f"{phase} ema")):
                acc = _num(entry.get(f"{phase}/{key}"))
                if epoch is not None and acc is not None:
                    curves[curve][epoch] = acc  # a resumed run logs some epochs again: the later one wins
    return {phase: sorted(points.items()) for phase, points in curves.items()}


def plot_curves(rows: Sequence[Dict[str, Any]], labels: Dict[int, str]) -> Section:
    title = "Test accuracy per epoch, dense training and retraining"
    per_job = {labels[id(r)]: r["_curves"] for r in rows if r.get("_curves")}
    if not per_job:
        return Section(title, note="No job wrote history.jsonl (runs log their per-epoch accuracy there, "
                                      "with or without W&B; older runs have none).")
    # Many jobs: each legend goes under its plot, one line a job, and the figure grows to hold it.
    entries = max(sum((phase in c) + (f"{phase} ema" in c) for c in per_job.values()) for phase in ("dense", "finetune"))
    below = entries > 6
    fig = _figure(width=11.0, height=4.2 + (0.12 * entries if below else 0))
    axes = fig.subplots(1, 2)
    for ax, phase in zip(axes, ("dense", "finetune")):
        for label, curves in per_job.items():
            if phase in curves:
                (line,) = ax.plot(*zip(*curves[phase]), lw=1.2, label=label)
                if f"{phase} ema" in curves:  # the moving average, dashed in the job's colour
                    ax.plot(*zip(*curves[f"{phase} ema"]), lw=1.2, ls="--", color=line.get_color(),
                            label=f"{label}, moving average")
        ax.set_title("dense training" if phase == "dense" else "retraining (pruning, QAT)", fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6, **({"loc": "upper left", "bbox_to_anchor": (0, -0.12), "frameon": False} if below else {}))
    axes[0].set_ylabel("test accuracy")
    return Section(title, _png(fig))


def sections(rows: Sequence[Dict[str, Any]]) -> List[Section]:
    labels = unique_labels(rows, swept_keys(rows))
    return [plot_accuracy(rows), plot_speedups(rows), plot_pareto(rows, labels),
            *plot_layer_heatmaps(rows, labels), plot_footprint(rows, labels), plot_curves(rows, labels)]


# ---------------------------------------------------------------- the page


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#222;max-width:1240px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:13px} .note{color:#555;font-style:italic;font-size:13px}
img{max-width:100%;height:auto;border:1px solid #eee}
table{border-collapse:collapse;font-size:12px;margin-top:8px} th,td{border:1px solid #ddd;padding:3px 6px;text-align:right}
th{background:#f4f4f4;position:sticky;top:0;text-align:center} td.l{text-align:left} tr.failed td{background:#fdecea}
.err{color:#b00020;text-align:left;min-width:260px;max-width:420px;overflow-wrap:anywhere}
.wide{overflow-x:auto;max-width:100%}
"""


def _cell(value: Any) -> str:
    x = _num(value) if not isinstance(value, bool) else None
    if x is None:
        return "" if value is None else str(value)
    if isinstance(value, int) or x.is_integer() and abs(x) >= 1:
        return f"{int(x):,}"
    return f"{x:.4g}"


def render_html(sweep_dir: Path, rows: Sequence[Dict[str, Any]], parts: Sequence[Section]) -> str:
    columns = [c for c in summary_columns(rows) if c not in ("job", "overrides", "prune_method", "quant_method")]
    columns = [c for c in columns if any(r.get(c) not in (None, "") for r in rows)]
    failed = sum(r["status"] != "ok" for r in rows)
    swept = set(swept_keys(rows))
    jobs = [r for r in rows if r.get("num") is not None] or rows
    common = sorted({o for r in jobs for o in r["_overrides"]
                     if split_override(o)[0] not in swept and all(o in x["_overrides"] for x in jobs)})
    out = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>sparsebench sweep {html.escape(sweep_dir.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>sparsebench sweep report: {html.escape(sweep_dir.name)}</h1>",
        f"<p class='meta'>{html.escape(str(sweep_dir.resolve()))}<br>{len(rows)} jobs, {len(rows) - failed} ok, "
        f"{failed} failed &middot; swept: {html.escape(', '.join(sorted(swept)) or 'nothing')} &middot; "
        f"shared overrides: {html.escape(' '.join(common) or 'none')} &middot; written "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</p>",
    ]
    for part in parts:
        out.append(f"<h2>{html.escape(part.title)}</h2>")
        if part.png:
            b64 = base64.b64encode(part.png).decode("ascii")
            out.append(f"<img alt='{html.escape(part.title)}' src='data:image/png;base64,{b64}'>")
        if part.note:
            out.append(f"<p class='note'>{html.escape(part.note)}</p>")
    out.append("<h2>Jobs</h2><div class='wide'><table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>")
    for r in rows:
        cells = []
        for c in columns:
            cls = "err" if c == "error" else "l" if c in ("status", "method") or c in swept else ""
            value = r.get(c) if c not in swept or applies(r, c) else None
            cells.append(f"<td class='{cls}'>{html.escape(_cell(value))}</td>")
        out.append(f"<tr class='{html.escape(r['status'])}'>{''.join(cells)}</tr>")
    out.append("</table></div><p class='meta'>All numbers also in summary.csv beside this page; one folder per job "
               "with metrics.json, layers.csv and manifest.json.</p></body></html>\n")
    return "\n".join(out)


def plot_filename(index: int, title: str) -> str:
    """``03-accuracy-speedup-pareto-front.png``: ordered as on the page, named after the plot."""
    return f"{index:02d}-{re.sub(r'[^a-z0-9]+', '-', title.lower()).strip('-')}.png"


def write_report(sweep_dir: Path, rows: Optional[List[Dict[str, Any]]] = None) -> List[Section]:
    """Write DIR/summary.csv, DIR/table.md, DIR/report.html and the page's figures as
    DIR/plots/*.png (for papers and docs), each file atomically; return the plot sections."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir) if rows is None else rows
    write_summary(sweep_dir / "summary.csv", rows)
    atomic_write_text(sweep_dir / "table.md", markdown_table(rows))
    parts = sections(rows)
    for index, part in enumerate(parts, 1):
        if part.png:
            atomic_write_bytes(sweep_dir / "plots" / plot_filename(index, part.title), part.png)
    atomic_write_text(sweep_dir / "report.html", render_html(sweep_dir, rows, parts))
    return parts


# ---------------------------------------------------------------- W&B


def log_wandb(sweep_dir: Path, rows: Sequence[Dict[str, Any]], parts: Sequence[Section], *, mode: str,
              project: str, entity: Optional[str]) -> str:
    """One W&B run (job_type=report, grouped with the sweep's jobs) holding the summary table and the plots."""
    import wandb
    from PIL import Image

    columns = summary_columns(rows)
    run = wandb.init(project=project, entity=entity, mode=mode, dir=str(sweep_dir), group=sweep_dir.name,
                     job_type="report", name=f"report/{sweep_dir.name}", reinit="finish_previous",
                     settings=wandb.Settings(console="off", silent=True))
    try:
        table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows], allow_mixed_types=True)
        images = {f"plots/{p.title}": wandb.Image(Image.open(io.BytesIO(p.png))) for p in parts if p.png}
        run.log({"summary": table, **images})
        run.summary.update({"jobs": len(rows), "jobs_failed": sum(r["status"] != "ok" for r in rows)})
        return run.dir
    finally:
        run.finish()


# ---------------------------------------------------------------- CLI


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="sparsebench-report",
                                     description="Summarize a sweep directory into summary.csv and report.html.")
    parser.add_argument("dir", type=Path, help="a sweep directory, e.g. multirun/default/2026-11-28_12-00-00")
    parser.add_argument("--wandb", action="store_true", help="also log the summary table and plots to W&B")
    parser.add_argument("--wandb-mode", default="offline", choices=("offline", "online"),
                        help="offline (default): files under DIR/wandb, upload later with `wandb sync`")
    parser.add_argument("--project", default="sparsebench", help="W&B project (default: sparsebench)")
    parser.add_argument("--entity", default=None, help="W&B entity (user or team); default: yours")
    args = parser.parse_args(argv)

    if not args.dir.is_dir():
        print(f"error: DIR={str(args.dir)!r} is not a directory: give a sweep directory such as "
              f"multirun/<name>/<time>", file=sys.stderr)
        sys.exit(2)
    rows = collect(args.dir)
    if not rows:
        print(f"error: DIR={str(args.dir)!r} holds no job folders (subfolders with .hydra/): give the "
              f"directory of a sweep (multirun/<name>/<time>) or of one run", file=sys.stderr)
        sys.exit(2)
    parts = write_report(args.dir, rows)
    failed = sum(r["status"] != "ok" for r in rows)
    print(f"summary: {args.dir / 'summary.csv'} ({len(rows)} jobs, {failed} failed; as Markdown: table.md)")
    print(f"report:  {args.dir / 'report.html'} (figures also in {args.dir / 'plots'}/)")
    if args.wandb:
        print(f"wandb:   {log_wandb(args.dir, rows, parts, mode=args.wandb_mode, project=args.project, entity=args.entity)}")


if __name__ == "__main__":
    main()
