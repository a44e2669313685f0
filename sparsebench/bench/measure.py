"""Check, then time, one layer case on one backend at one batch size; estimate break-even sparsity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from sparsebench.bench.backends import Prepared
from sparsebench.bench.cases import LayerCase
from sparsebench.sparse.timing import Timing, rotation_count, time_calls

# Dense fp16 tensor-core peak (TFLOP/s, fp32 accumulation) by GPU name: the yardstick for a row's
# `peak_share`, the fraction of it its work reaches (the real, nonzero work for a sparse backend).
FP16_TENSOR_PEAK_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 SXM": 989.4, "H200": 989.4, "H100 PCIe": 756.5, "A100": 312.0}


def fp16_tensor_peak_tflops(device: torch.device) -> Optional[float]:
    """The table's peak for this GPU; None on the CPU or a GPU it does not name."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in FP16_TENSOR_PEAK_TFLOPS.items() if k in name), None)


class MismatchError(RuntimeError):
    """A backend computed something else than the dense reference: an error, never a row."""


@dataclass(frozen=True)
class TimingSettings:
    warmup: int = 10
    repeats: int = 50
    cache: str = "flush"
    cpu_threads: int = 1


def make_inputs(case: LayerCase, batch: int, device: torch.device, cache: str, seed: int = 0) -> List[torch.Tensor]:
    """fp32 NCHW inputs of the layer's real shape (CPU); several when rotating through the GPU cache."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, *case.in_shape)
    per = 4 * batch * int(torch.tensor(case.in_shape).prod())
    count = rotation_count(per, device) if cache == "rotate" else 1
    first = torch.randn(shape, generator=g)
    # Rotated copies are slightly rescaled: same statistics, different bytes at different addresses.
    return [first] + [first * (1 + 1e-3 * i) for i in range(1, count)]


def reference_output(
    case: LayerCase, weight: torch.Tensor, x: torch.Tensor, device: Optional[torch.device] = None
) -> torch.Tensor:
    """The dense layer in fp64 (on ``device``: the GPU is much faster at batch 128), returned on the CPU."""
    device = device or x.device
    w = weight.to(device, torch.float64)
    b = case.bias.to(device, torch.float64) if case.bias is not None else None
    x = x.to(device, torch.float64)
    if case.kind == "conv2d":
        y = F.conv2d(x, w, b, stride=case.stride, padding=case.padding)
    else:
        y = F.linear(x, w, b)
    return y.cpu()


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref| (NaN/Inf count as infinitely wrong)."""
    y = y.detach().to("cpu", torch.float64)
    if y.shape != ref.shape:
        return float("inf")
    diff = (y - ref).abs().max().item() if ref.numel() else 0.0
    scale = max(ref.abs().max().item() if ref.numel() else 0.0, 1e-12)
    return float("inf") if diff != diff else diff / scale


def check(
    case: LayerCase,
    backend: str,
    prepared: Prepared,
    x: torch.Tensor,
    batch: int,
    reference: Optional[torch.Tensor] = None,
) -> float:
    """Run once and compare with the dense reference (computed here unless given); raise MismatchError
    beyond the backend's tolerance."""
    with torch.no_grad(), prepared.context():
        y = prepared.run(prepared.convert(x))
    if reference is None:
        reference = reference_output(case, prepared.weight, x)
    err = relative_error(y.float(), reference)
    if not err <= prepared.tol:
        raise MismatchError(
            f"bench: backend {backend} computes layer {case.name} (batch {batch}) wrongly: "
            f"max error {err:.3g} of the largest output, allowed {prepared.tol:g}"
        )
    return err


def time_prepared(
    prepared: Prepared, inputs: Sequence[torch.Tensor], device: torch.device, settings: TimingSettings
) -> Timing:
    converted = [prepared.convert(x) for x in inputs]
    calls = [(lambda xi=xi: prepared.run(xi)) for xi in converted]
    with torch.no_grad(), prepared.context():
        return time_calls(
            calls,
            device,
            warmup=settings.warmup,
            repeats=settings.repeats,
            cache=settings.cache,
            cpu_threads=settings.cpu_threads,
        )


def traffic_bytes(case: LayerCase, prepared: Prepared, batch: int) -> int:
    """Bytes the layer must at least move: weights (as stored by the backend), input and output."""
    acts = batch * (int(torch.tensor(case.in_shape).prod()) + int(torch.tensor(case.out_shape()).prod()))
    return prepared.weight_bytes + prepared.act_bytes * acts


def result_row(
    case: LayerCase,
    backend: str,
    batch: int,
    timing: Timing,
    prepared: Prepared,
    error: float,
    peak_tflops: Optional[float] = None,
) -> Dict[str, object]:
    flops = case.sparse_flops(batch) if prepared.sparse else case.dense_flops(batch)
    tflops = flops / (timing.median_us * 1e6) if timing.median_us > 0 else None
    return {
        **case.facts(),
        "backend": backend,
        "batch": batch,
        "time_us": round(timing.median_us, 3),
        "spread_us": round(timing.spread_us, 3),
        "p25_us": round(timing.p25_us, 3),
        "p75_us": round(timing.p75_us, 3),
        "runs": timing.runs,
        "flops": flops,
        "bytes": traffic_bytes(case, prepared, batch),
        "gflops": round(tflops * 1e3, 3) if tflops is not None else None,
        "peak_share": float(f"{tflops / peak_tflops:.4g}") if tflops is not None and peak_tflops else None,
        "max_rel_error": float(f"{error:.3g}"),
        "layout": prepared.layout,  # the activations' layout the backend ran in
    }


# ------------------------------------------------------------------ break-even sparsity


def fit_time_vs_nnz(points: Sequence[Tuple[int, float]]) -> Optional[Tuple[float, float]]:
    """Least-squares t = a + b * nnz over (nnz, time) points with at least two distinct nnz."""
    if len({n for n, _ in points}) < 2:
        return None
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    b = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx
    return my - b * mx, b


def break_even_sparsity(points: Sequence[Tuple[int, float]], baseline_us: float, numel: int) -> Optional[float]:
    """The sparsity at which the sparse backend's modelled time equals ``baseline_us``.

    Model: t(nnz) = a + b * nnz, fitted to the measured points. Returns a fraction in [0, 1]
    (0: it would win even fully dense), or None when its fixed cost a alone already exceeds the
    baseline (no sparsity breaks even) or the fit is impossible.
    """
    fit = fit_time_vs_nnz(points)
    if fit is None:
        return None
    a, b = fit
    if baseline_us <= a:
        return None
    if b <= 0:  # time does not grow with nnz (noise): it wins wherever it is below the baseline
        return 0.0
    nnz_star = (baseline_us - a) / b
    return round(min(1.0, max(0.0, 1.0 - nnz_star / numel)), 4)
