"""The kernel grid's work (``sparsebench-bench``, bench/grid.py): layer shapes from a layer set or a model,
one synthetic case per layer x batch x sparsity x bit width timed against the baselines, the summary."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch
from omegaconf import OmegaConf
from torch import nn
from tqdm.auto import tqdm

from sparsebench import layers as layer_facts
from sparsebench.bench.cases import synthetic_case
from sparsebench.bench.grid import GridAppConfig, validate
from sparsebench.bench.measure import TimingSettings, break_even_sparsity
from sparsebench.bench.suite import LayerBench, plan_backends, uniform
from sparsebench.config import DataConfig, ModelConfig
from sparsebench.models import build_model
from sparsebench.rundir import BENCH, write_csv
from sparsebench.sparse.timing import cpu_thread_count
from sparsebench.track import envelope

# Input geometry of each dataset (channels, size, classes): shapes only, nothing is loaded.
DATA_GEOMETRY = {"digits": (1, 8, 10), "mnist": (1, 28, 10), "cifar10": (3, 32, 10)}


# ------------------------------------------------------------------ layer shapes


def shapes_from_layer_set(layer_set: Any) -> List[Dict[str, Any]]:
    out = []
    for layer in layer_set.layers:
        linear = layer.kind == "linear"
        out.append(
            {
                "name": layer.name,
                "kind": layer.kind,
                "c_in": layer.c_in,
                "c_out": layer.c_out,
                "kernel": 1 if linear else layer.kernel,
                "hw": 1 if linear else layer.hw,
                "stride": 1 if linear else layer.stride,
                "padding": 0 if linear else (layer.kernel // 2 if layer.padding is None else layer.padding),
            }
        )
    return out


def shapes_from_model(model_cfg: ModelConfig, data_cfg: DataConfig) -> List[Dict[str, Any]]:
    """The model's conv/linear layers at the data's input size (one forward pass at batch 1 on the CPU)."""
    if data_cfg.name == "synthetic":
        channels, size, classes = data_cfg.shape[0], data_cfg.shape[1], data_cfg.num_classes
    else:
        channels, size, classes = DATA_GEOMETRY[data_cfg.name]
    model = build_model(
        model_cfg.name, in_channels=channels, num_classes=classes, image_size=size, width=model_cfg.width
    )
    shapes = layer_facts.input_shapes(model, torch.zeros(1, channels, size, size))
    out = []
    for name, m in layer_facts.weight_layers(model).items():
        if isinstance(m, nn.Conv2d):
            c, h, _ = shapes[name]
            out.append(
                {
                    "name": name,
                    "kind": "conv2d",
                    "c_in": c,
                    "c_out": m.out_channels,
                    "kernel": m.kernel_size[0],
                    "hw": h,
                    "stride": m.stride[0],
                    "padding": m.padding[0],
                }
            )
        else:
            out.append(
                {
                    "name": name,
                    "kind": "linear",
                    "c_in": m.in_features,
                    "c_out": m.out_features,
                    "kernel": 1,
                    "hw": 1,
                    "stride": 1,
                    "padding": 0,
                }
            )
    return out


# ------------------------------------------------------------------ the grid


def run_grid(cfg: GridAppConfig, shapes: List[Dict[str, Any]], device) -> List[Dict[str, Any]]:
    plan = plan_backends(cfg.backend, cfg.bench, device)
    settings = TimingSettings(
        warmup=cfg.bench.warmup, repeats=cfg.bench.repeats, cache=cfg.bench.cache, cpu_threads=cfg.bench.cpu_threads
    )
    sparsities, bits_list = list(cfg.grid.sparsities), list(cfg.grid.bits)
    # With two or more sparsities the break-even fit uses them all (below); with one, a thinned copy.
    runner = LayerBench(plan, settings, break_even=cfg.bench.break_even and len(sparsities) < 2)
    jobs = [(s, b, sp, bits) for s in shapes for b in cfg.bench.batch_sizes for sp in sparsities for bits in bits_list]
    rows: List[Dict[str, Any]] = []
    with cpu_thread_count(cfg.bench.cpu_threads if plan.device.type == "cpu" else 0):
        for shape, batch, sparsity, bits in tqdm(
            jobs, desc=f"sparsebench-bench ({plan.sparse})", disable=not cfg.bench.progress
        ):
            rows += _run_case(runner, shape, batch, sparsity, bits, cfg.seed, cfg.grid.row_skew)
    if cfg.bench.break_even and len(sparsities) >= 2:
        add_grid_break_even(rows, plan.sparse, break_even_sparsity)
    return uniform(rows)


def _run_case(
    runner, shape: Dict[str, Any], batch: int, sparsity: float, bits: int, seed: int, row_skew: float = 0.0
) -> List[Dict[str, Any]]:
    g = torch.Generator().manual_seed(seed + int(round(sparsity * 1e4)) * 100 + bits)
    case = synthetic_case(
        shape["name"],
        shape["kind"],
        shape["c_in"],
        shape["c_out"],
        shape["kernel"],
        shape["hw"],
        shape["stride"],
        shape["padding"],
        sparsity,
        bits,
        g,
        row_skew=row_skew,
    )
    rows = runner.run(case, batch, shape_key=shape["name"])
    for r in rows:  # the nominal sparsity (the mask has round(s * numel) zeros; nnz is exact)
        if r["sparsity"] is not None:
            r["sparsity"] = sparsity
    return rows


def add_grid_break_even(rows: List[Dict[str, Any]], sparse: str, estimate) -> None:
    """Per (layer, batch, bits): t = a + b*nnz fitted over the measured sparsities -> break-even per baseline."""
    ours = [r for r in rows if r["backend"] == sparse]
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in ours:
        groups.setdefault((r["layer"], r["batch"], r["bits"]), []).append(r)
    for (layer, batch, _), group in groups.items():
        points = [(r["nnz"], r["time_us"]) for r in group]
        for r in rows:  # fixed-time baselines only: dense ones and 2:4 (their rows carry no sparsity)
            if r["layer"] == layer and r["batch"] == batch and r["backend"] != sparse and r["sparsity"] is None:
                for g in group:
                    g[f"break_even_vs_{r['backend']}"] = estimate(points, r["time_us"], g["params"])


def geomean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else float("nan")


def summarize(rows: List[Dict[str, Any]], sparse: str) -> Dict[str, float]:
    """Geomean over layers of our speedup vs each baseline, per batch, sparsity and bits; and the median
    share of the GPU's fp16 tensor peak our real work reaches, where the GPU's peak is known."""
    ours = [r for r in rows if r["backend"] == sparse]
    out: Dict[str, float] = {}
    keys = sorted({(r["batch"], r["sparsity"], r["bits"]) for r in ours})
    baselines = sorted({k[len("speedup_vs_") :] for r in ours for k in r if k.startswith("speedup_vs_")})
    for batch, sparsity, bits in keys:
        sel = [r for r in ours if (r["batch"], r["sparsity"], r["bits"]) == (batch, sparsity, bits)]
        for b in baselines:
            value = geomean([r.get(f"speedup_vs_{b}") for r in sel])
            out[f"geomean_speedup/{b}/b{batch}/s{sparsity:g}/{bits}bit"] = round(value, 4)
        shares = [r["peak_share"] for r in sel if r.get("peak_share") is not None]
        if shares:
            out[f"median_peak_share/b{batch}/s{sparsity:g}/{bits}bit"] = float(f"{statistics.median(shares):.4g}")
    return out


def format_table(rows: List[Dict[str, Any]], sparse: str) -> str:
    """One line per case of the backend under test: its time and speedup over each baseline."""
    ours = [r for r in rows if r["backend"] == sparse]
    baselines = sorted({k[len("speedup_vs_") :] for r in ours for k in r if k.startswith("speedup_vs_")})
    head = f"{'layer':<20} {'batch':>5} {'sparsity':>8} {'bits':>4} {sparse + ' us':>18}" + "".join(
        f" {'x ' + b:>22}" for b in baselines
    )
    lines = [head, "-" * len(head)]
    for r in ours:
        cells = "".join(f" {r.get('speedup_vs_' + b) or float('nan'):>22.2f}" for b in baselines)
        lines.append(
            f"{r['layer'][:20]:<20} {r['batch']:>5} {r['sparsity']:>8.3f} {r['bits']:>4} {r['time_us']:>18.1f}{cells}"
        )
    return "\n".join(lines)


def grid_main(cfg: GridAppConfig, run_dir: Path, overrides: Sequence[str]) -> Dict[str, Any]:
    with envelope(run_dir) as record:
        validate(cfg, overrides)
        record.start(
            OmegaConf.to_container(cfg, resolve=True),
            cfg.seed,
            overrides,
            cfg.logger,
            name=f"{cfg.name}/{run_dir.name}",
        )
        shapes = shapes_from_model(cfg.model, cfg.data) if cfg.model is not None else shapes_from_layer_set(cfg.layers)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        rows = run_grid(cfg, shapes, device)
        write_csv(run_dir / BENCH, rows)
        sparse = rows[0]["backend"] if rows else cfg.backend.name
        print(format_table(rows, sparse))
        record.metrics.update(summarize(rows, sparse), backend=sparse, rows=len(rows))
        record.tracker.table("bench", rows)
    return record.metrics
