"""The sweep as tables: summary.csv (every job, every column) and table.md (the finished jobs, for docs)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Sequence

from sparsebench.report.jobs import (
    FASTER,
    SPEEDUP,
    applies,
    as_float,
    baseline_batch,
    finished,
    is_shared_dense,
    job_name,
    metric_keys,
    spelled,
    swept_keys,
)
from sparsebench.rundir import write_csv

# Leading summary.csv columns, in this order: the swept keys go after the first four, the speedups and layer
# counts after the rest.
COLUMNS = [
    "num",
    "job",
    "status",
    "overrides",
    "method",
    "prune_method",
    "quant_method",
    "target_sparsity",
    "sparsity",
    "bits",
    "acc_dense",
    "acc_final",
    "dense_bytes",
    "footprint_bytes",
    "compression",
    "macs_kept",
    "runtime_s",
    "backend",
    "noisy_timings",
]


def summary_columns(rows: Sequence[Dict[str, Any]]) -> List[str]:
    swept = swept_keys(rows)
    return COLUMNS[:4] + swept + COLUMNS[4:] + metric_keys(rows, SPEEDUP) + metric_keys(rows, FASTER) + ["error"]


def write_summary(path: Path, rows: Sequence[Dict[str, Any]]) -> None:
    columns = summary_columns(rows)
    write_csv(path, [{c: row.get(c) for c in columns} for row in rows])


def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The finished jobs as a Markdown table for docs: the swept values, top-1 and its change from
    dense, footprint and compression, the multiply-adds the weights keep, whole-network speedups and the
    layers faster than each baseline.
    The jobs left out (failed, died, still running) are named below it with their error. Columns are
    the keys that differ between the jobs shown: a key only the left-out jobs set gets none."""
    shown = finished(rows, "acc_final")
    swept = swept_keys(shown)
    speedups, faster = metric_keys(rows, SPEEDUP), metric_keys(rows, FASTER)
    macs = any(as_float(r.get("macs_kept")) is not None for r in shown)  # jobs before macs_kept have none
    head = ([k.rsplit(".", 1)[-1] for k in swept] or ["job"]) + ["top-1", "Δ vs dense", "footprint", "compression"]
    head += ["MACs kept"] if macs else []
    head += [f"vs {SPEEDUP.match(k)['baseline']} b{SPEEDUP.match(k)['batch']}" for k in speedups]
    head += [f"layers faster than {FASTER.match(k)['baseline']} b{FASTER.match(k)['batch']}" for k in faster]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    marked = False

    def number(value: Any, fmt: str) -> str:
        return fmt.format(as_float(value)) if as_float(value) is not None else "—"

    labels = _table_labels(shown, swept)
    for r in shown:
        reference, label = is_shared_dense(r), labels[id(r)]
        acc, dense = as_float(r["acc_final"]), as_float(r.get("acc_dense"))
        delta = f"{100 * (acc - dense):+.2f}" if dense is not None and not reference else "—"
        megabytes = as_float(r.get("footprint_bytes")) / 1e6 if as_float(r.get("footprint_bytes")) is not None else None
        cells = label + [
            f"{100 * acc:.2f}%",
            delta,
            number(megabytes, "{:.3f} MB"),
            number(r.get("compression"), "{:.1f}x"),
        ]
        cells += [number(r.get("macs_kept"), "{:.1%}")] if macs else []
        noisy = set(filter(None, r.get("noisy_timings", "").split(", ")))
        for k in speedups:
            baseline, batch = baseline_batch(k)
            mark = " (noisy)" if noisy & {f"{baseline}/b{batch}", f"{r.get('backend')}/b{batch}"} and r.get(k) else ""
            marked = marked or bool(mark)
            cells.append(number(r.get(k), "{:.2f}x") + mark)
        cells += [str(r.get(k) or "—") for k in faster]
        lines.append("| " + " | ".join(cells) + " |")
    shown_ids = {id(r) for r in shown}
    left_out = [r for r in rows if id(r) not in shown_ids]
    if left_out:
        lines += [
            "",
            f"Not in the table ({len(left_out)} of {len(rows)} jobs): "
            + "; ".join(f"`{r['job']}` ({_first_line(r.get('error') or 'no top-1')})" for r in left_out)
            + ".",
        ]
    if marked:
        lines += [
            "",
            "(noisy): one of the two timings spread by more than a tenth of its median (`bench/noisy` in "
            "the job's metrics.json): something else used the GPU while it was measured.",
        ]
    return "\n".join(lines) + "\n"


def _table_labels(rows: Sequence[Dict[str, Any]], swept: Sequence[str]) -> Dict[int, List[str]]:
    """Each row's label cells by id(row): the swept values it reads ("dense" for the sweep's shared
    dense model). Rows that would read alike (they differ only in keys neither reads) end with their job."""
    labels: Dict[int, List[str]] = {}
    for r in rows:
        labels[id(r)] = (
            [spelled(r.get(k)) if applies(r, k) else "" for k in swept]
            if not is_shared_dense(r)
            else ["dense"] + [""] * (len(swept) - 1)
        ) or [r["job"]]
    repeated = {label for label, n in Counter(tuple(v) for v in labels.values()).items() if n > 1}
    for r in rows:
        label = labels[id(r)]
        if tuple(label) in repeated:
            label[-1] = f"{label[-1]} ({job_name(r)})".lstrip()
    return labels


def _first_line(error: Any) -> str:
    """An error's first non-empty line, as Markdown code (an error may hold <...> that HTML would eat)."""
    line = next((part for part in str(error).splitlines() if part.strip()), "")
    return "`" + line.replace("`", "'") + "`"
