"""Reading a sweep: one row per job folder (what it ran, what it measured), in order of the swept values,
and the helpers every table and plot shares (numbers, labels, which keys a job reads)."""

from __future__ import annotations

import csv
import functools
import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

from sparsebench import rundir
from sparsebench.quant.config import method_reads

SPEEDUP = re.compile(r"^speedup/(?P<baseline>[^/]+)/b(?P<batch>\d+)$")
FASTER = re.compile(r"^faster/(?P<baseline>[^/]+)/b(?P<batch>\d+)$")  # "W of L" layers, from layers.csv
LAYER_SPEEDUP = "speedup_vs_"
DIED = "no metrics.json: the job died before it finished (killed, out of memory, or still running)"
# metrics.json keys copied as they are.
MEASURED = (
    "sparsity",
    "acc_dense",
    "acc_final",
    "dense_bytes",
    "footprint_bytes",
    "compression",
    "macs_kept",
    "runtime_s",
)
GLOBAL_SCOPE_KEYS = ("prune.macs_exponent", "prune.max_layer_sparsity")  # read only under one threshold


def job_dirs(sweep_dir: Path) -> List[Path]:
    """The job folders of a sweep (Hydra's, with .hydra/; or a shared dense run, with metrics.json).

    Reference runs without a job number (``dense-<key>``) come first, then jobs by number; a
    run directory given on its own is its one job.
    """
    subs = [
        p
        for p in Path(sweep_dir).iterdir()
        if p.is_dir() and ((p / ".hydra").is_dir() or (p / "metrics.json").is_file())
    ]
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
    config = _load_yaml(job_dir / ".hydra" / "config.yaml") or rundir.manifest_config(job_dir) or {}
    try:
        metrics, unreadable = rundir.read_metrics(job_dir), None
    except rundir.Unreadable as e:
        metrics, unreadable = None, f"unreadable metrics.json: {e}"
    hydra = _hydra_yaml(job_dir)
    prune_method = _dig(config, "prune.method") or "none"
    if not (
        _dig(config, "prune.final_sparsity") or _dig(config, "prune.overrides") or _dig(config, "prune.overrides_file")
    ):
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
        row["error"] = unreadable or DIED
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
                if not (col or "").startswith(LAYER_SPEEDUP) or as_float(value) is None:
                    continue
                baseline = col[len(LAYER_SPEEDUP) :]
                row_backend = rec.get("backend") or "?"
                if row_backend == baseline or (backend and row_backend != backend):
                    continue
                batch = int(as_float(rec.get("batch")) or 0)
                out[(row_backend, baseline, batch)][rec.get("layer", "?")] = as_float(value)
    return out


def read_curves(job_dir: Path) -> Dict[str, List[Tuple[float, float]]]:
    """history.jsonl -> {phase: [(epoch, test accuracy), ...]} for the dense and finetune phases.

    A phase that kept a moving average of its weights (trainer.ema_decay) also gives "<phase> ema".
    """
    curves: Dict[str, Dict[float, float]] = defaultdict(dict)
    path = job_dir / "history.jsonl"
    if not path.exists():
        return {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:  # a line cut short by a crash
            continue
        if not isinstance(entry, dict):
            continue
        for phase in ("dense", "finetune"):
            epoch = as_float(entry.get(f"{phase}/epoch"))
            for key, curve in (("acc", phase), ("acc_ema", f"{phase} ema")):
                acc = as_float(entry.get(f"{phase}/{key}"))
                if epoch is not None and acc is not None:
                    curves[curve][epoch] = acc  # a resumed run logs some epochs again: the later one wins
    return {phase: sorted(points.items()) for phase, points in curves.items()}


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
        return (0,) if v is None or v == "" else (1, as_float(v)) if as_float(v) is not None else (2, str(v))

    return (not is_shared_dense(row),) + tuple(value(k) for k in swept)


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


def as_float(value: Any) -> Optional[float]:
    """A cell's value as a finite float, else None (missing, text, nan)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def finished(rows: Iterable[Dict[str, Any]], *keys: str) -> List[Dict[str, Any]]:
    """The jobs that ended ok with a number for each of ``keys``."""
    return [r for r in rows if r["status"] == "ok" and all(as_float(r.get(k)) is not None for k in keys)]


def metric_keys(rows: Sequence[Dict[str, Any]], pattern: "re.Pattern[str]") -> List[str]:
    """The rows' keys matching ``pattern`` (<kind>/<baseline>/b<batch>), by baseline, then batch."""
    return sorted({k for r in rows for k in r if pattern.match(k)}, key=baseline_batch)


def baseline_batch(key: str) -> Tuple[str, int]:
    """A speedup or layer-count key's baseline and batch, to sort by."""
    m = SPEEDUP.match(key) or FASTER.match(key)
    return (m["baseline"], int(m["batch"])) if m else (key, 0)


def is_shared_dense(row: Dict[str, Any]) -> bool:
    """The sweep's shared dense model (trainer.init_from=shared), not one of its jobs."""
    return rundir.is_shared_dense(row["job"])


def job_label(row: Dict[str, Any], swept: Sequence[str]) -> str:
    """Short name for plots: the swept values ("final_sparsity=0.9 bits=4"), else the job number."""
    parts = [f"{k.rsplit('.', 1)[-1]}={row.get(k)}" for k in swept if row.get(k) not in (None, "") and applies(row, k)]
    if row.get("num") is None:
        return row["job"]  # a reference run such as dense-<key>
    return " ".join(parts) or f"job {row['num']}"


def unique_labels(rows: Sequence[Dict[str, Any]], swept: Sequence[str]) -> Dict[int, str]:
    """Each row's job_label by id(row); a label two jobs share (they differ only in keys neither
    reads) adds the job's number (else its folder), so no plot keyed by label drops one."""
    labels = [job_label(r, swept) for r in rows]
    repeated = {label for label, n in Counter(labels).items() if n > 1}
    return {id(r): label if label not in repeated else f"{label} ({job_name(r)})" for r, label in zip(rows, labels)}


def job_name(row: Dict[str, Any]) -> str:
    """ "job N", or the folder of a job without a number."""
    return f"job {row['num']}" if row.get("num") is not None else row["job"]


def spelled(value: Any) -> str:
    """A swept value as an override would spell it (null, not Python's None)."""
    return "null" if value is None else str(value)
