"""A trained model on the backends: every conv/linear layer and the whole network, timed and checked."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsebench.bench.backends import BACKENDS, Unsupported, cudnn_precision, faster_layout
from sparsebench.bench.cases import cases_from_model
from sparsebench.bench.measure import TimingSettings, relative_error
from sparsebench.bench.network import backend_network, check_network, network_input, reference_network, time_networks
from sparsebench.bench.suite import LayerBench, plan_backends, uniform
from sparsebench.sparse.format import load_packed
from sparsebench.sparse.timing import cpu_thread_count

if TYPE_CHECKING:  # annotations only: no import at run time
    from sparsebench.bench.config import BackendConfig, BenchConfig

log = logging.getLogger("sparsebench.bench")


def benchmark_model(
    backend: BackendConfig,
    bench: BenchConfig,
    model: nn.Module,
    packed: Optional[Path],
    sample: torch.Tensor,
    device: torch.device,
) -> Tuple[List[Dict[str, Any]], Dict[str, float]]:
    """Time every conv/linear layer and the whole network on the configured backends.

    Returns (layers.csv rows: one per layer x backend x batch, metrics such as
    ``speedup/<baseline>/b<batch>``). With ``bench.enabled=false`` both are empty.

    ``packed``: the exported packed.safetensors (its layers are what the sparse backend runs);
    None packs the model's current weights here. Every backend's output is checked against
    the dense fp64 reference before it is timed; a mismatch raises ``MismatchError``.
    """
    if not bench.enabled:
        return [], {}

    plan = plan_backends(backend, bench, device)
    settings = TimingSettings(
        warmup=bench.warmup, repeats=bench.repeats, cache=bench.cache, cpu_threads=bench.cpu_threads
    )
    packed_layers, meta = load_packed(packed) if packed is not None else (None, {})
    # The export folds BatchNorms into the packed layers: every network then runs them as the identity.
    folded = sorted(set(meta.get("folded_bn", {}).values()))
    was_training = model.training
    model.eval()
    # On the CPU everything (checks, fp64 references) runs with the timing's thread count: on a busy
    # host, multi-threaded tiny ops wait whole scheduler quanta at their barriers.
    try:
        with cpu_thread_count(bench.cpu_threads if plan.device.type == "cpu" else 0):
            cases = cases_from_model(model, sample, packed_layers)
            rows: List[Dict[str, Any]] = []
            if bench.layers:
                runner = LayerBench(plan, settings, break_even=bench.break_even)
                jobs = [(c, b) for c in cases for b in bench.batch_sizes]
                for case, batch in tqdm(
                    jobs,
                    desc=f"bench layers ({plan.sparse} vs {len(plan.baselines)} baselines)",
                    disable=not bench.progress,
                    leave=False,
                ):
                    rows += runner.run(case, batch)
            metrics = _network_metrics(plan, bench, settings, model, cases, sample, folded) if bench.network else {}
    finally:
        model.train(was_training)
    metrics["bench/backend"] = plan.sparse
    metrics["bench/skipped"] = ", ".join(f"{k} ({v})" for k, v in plan.skipped.items())
    return uniform(rows), metrics


OTHER_LAYOUT = "other-layout:"  # the key of our network in its other activation layout, timed beside it


def _network_metrics(
    plan, bench, settings, model: nn.Module, cases, sample: torch.Tensor, folded: List[str]
) -> Dict[str, Any]:
    """``speedup/<baseline>/b<batch>`` and ``latency_us/<backend>/b<batch>`` for the whole network."""

    names = [plan.sparse] + [b for b in plan.baselines if b != "semi_structured_2to4"]
    if "semi_structured_2to4" in plan.baselines:
        log.info("bench: whole network skips semi_structured_2to4 (it computes its own 2:4-pruned model)")
    ref_net = reference_network(model, cases, plan.device, folded)
    metrics: Dict[str, Any] = {}
    noisy: List[str] = []
    for batch in bench.batch_sizes:
        x = network_input(sample, batch)
        with torch.no_grad():
            ref = ref_net(x.to(plan.device, torch.float64)).cpu()
            # How far the packed model (folded, quantized) is from the trained model itself: an export check,
            # so the trained model runs in full fp32 (cuDNN's default TF32 convs alone would differ by ~1e-4).
            with cudnn_precision(tf32=False, benchmark=torch.backends.cudnn.benchmark):
                own = model(x.to(next(model.parameters()).device)).float().cpu()
        metrics[f"network_export_error/b{batch}"] = float(f"{relative_error(own, ref):.3g}")
        nets, prepared, errors = _networks(plan, names, model, cases, folded, x, ref, batch)
        timings, graphs = time_networks(nets, prepared, x, plan.device, settings, bench.graphs)
        metrics["bench/graphs"] = graphs
        layout = _keep_faster_layout(plan.sparse, timings, prepared, errors)
        if layout:
            metrics[f"network_layout/{plan.sparse}/b{batch}"] = layout
        for name in names:
            if name in errors:
                metrics[f"network_error/{name}/b{batch}"] = errors[name]
        for name, t in timings.items():
            metrics[f"latency_us/{name}/b{batch}"] = round(t.median_us, 3)
            metrics[f"latency_spread_us/{name}/b{batch}"] = round(t.spread_us, 3)
            if t.noisy and plan.device.type == "cuda":  # a CPU's timings jitter more: the threshold is a GPU's
                noisy.append(f"{name}/b{batch}")
                log.warning(
                    "bench: %s at batch %d spread %.0f us around its median %.0f us: something else may "
                    "have been using the device; speedups against it are not to be trusted",
                    name,
                    batch,
                    t.spread_us,
                    t.median_us,
                )
        ours = timings[plan.sparse].median_us
        for name in names[1:]:
            if name in timings:
                metrics[f"speedup/{name}/b{batch}"] = round(timings[name].median_us / ours, 4)
    metrics["bench/noisy"] = ", ".join(noisy)  # <backend>/b<batch> whose whole-network timing spread widely
    return metrics


def _networks(plan, names: List[str], model: nn.Module, cases, folded: List[str], x, ref, batch: int) -> tuple:
    """Each backend's network, checked against ``ref``: ``(nets, first prepared layer, error)`` by key.
    Ours also in its other activation layout, under ``OTHER_LAYOUT + name``, where its layers have one."""
    nets, prepared, errors = {}, {}, {}
    for name in names:
        try:
            per_layer = {c.name: BACKENDS[name].prepare(c, plan.device, plan.activations) for c in cases}
        except Unsupported as e:
            log.info("bench: whole network skips %s: %s", name, e)
            continue
        variants = {name: per_layer}
        if name == plan.sparse and any(p.other_layout is not None for p in per_layer.values()):
            variants[OTHER_LAYOUT + name] = {
                c: (p.other_layout() if p.other_layout is not None else p) for c, p in per_layer.items()
            }
        for key, layers in variants.items():
            nets[key] = backend_network(model, layers, plan.device, folded)
            prepared[key] = next(iter(layers.values()))
            label = f"{name} ({prepared[key].layout})" if len(variants) > 1 else name
            errors[key] = check_network(label, nets[key], prepared[key], x, ref, batch)
    return nets, prepared, errors


def _keep_faster_layout(name: str, timings: Dict[str, Any], prepared: Dict[str, Any], errors: Dict[str, float]):
    """Ours in the faster of its layouts, under its own name; returns that layout ("nchw" or "nhwc"),
    or None where ours did not run."""
    key = OTHER_LAYOUT + name
    other = timings.pop(key, None)
    if name not in timings:
        return None
    if other is not None and faster_layout(timings[name].median_us, other.median_us):
        timings[name], errors[name] = other, errors[key]
    else:
        key = name
    return prepared[key].layout
