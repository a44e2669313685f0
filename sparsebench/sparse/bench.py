"""Kernel benchmark pieces: the layer set, random sparse(-quantized) layers, graph-replay timing,
the backends, and the sweep that writes bench.csv rows. ``scripts/bench_kernels.py`` is the CLI;
the harness (``sparsebench-bench``) can import ``LAYERS``, ``random_layer``, ``time_graph``,
``BACKENDS`` and ``run_sweep`` from here.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from sparsebench.sparse.format import PackedLayer, pack_weight
from sparsebench.sparse.ops import conv_output_size, kernels_available, sparse_conv2d_into


@dataclass(frozen=True)
class ConvShape:
    name: str
    cin: int
    cout: int
    k: int
    hw: int  # input height = width
    stride: int = 1

    @property
    def padding(self) -> int:
        return self.k // 2

    @property
    def out_hw(self) -> int:
        return conv_output_size(self.hw, self.k, self.stride, self.padding)

    def flops(self, batch: int) -> int:
        """Dense multiply-adds x 2."""
        return 2 * batch * self.cout * self.out_hw**2 * self.cin * self.k * self.k


# DESIGN.md section 6. Layers of the same shape are measured once (the name lists them all).
LAYERS: List[ConvShape] = [
    ConvShape("vgg.conv2", 64, 64, 3, 32),
    ConvShape("vgg.conv3", 64, 128, 3, 16),
    ConvShape("vgg.conv4", 128, 128, 3, 16),
    ConvShape("vgg.conv5", 128, 256, 3, 8),
    ConvShape("vgg.conv6-7", 256, 256, 3, 8),
    ConvShape("vgg.conv8", 256, 512, 3, 4),
    ConvShape("vgg.conv9-10", 512, 512, 3, 4),
    ConvShape("vgg.conv11-13", 512, 512, 3, 2),
    ConvShape("r50.3x3_64@56", 64, 64, 3, 56),
    ConvShape("r50.3x3_128@28", 128, 128, 3, 28),
    ConvShape("r50.3x3_256@14", 256, 256, 3, 14),
    ConvShape("r50.3x3_512@7", 512, 512, 3, 7),
    ConvShape("r50.1x1_64-256@56", 64, 256, 1, 56),
    ConvShape("r50.1x1_256-64@56", 256, 64, 1, 56),
    ConvShape("r50.1x1_512-128@28", 512, 128, 1, 28),
    ConvShape("r50.1x1_1024-256@14", 1024, 256, 1, 14),
    ConvShape("r50.1x1_2048-512@7", 2048, 512, 1, 7),
    ConvShape("r50.3x3s2_128@56", 128, 128, 3, 56, 2),
]


# ---------------------------------------------------------------------------------------
# random layers


def random_sparse_weight(shape: Sequence[int], sparsity: float, gen: torch.Generator,
                         empty_rows: int = 0) -> torch.Tensor:
    """Gaussian weight with exactly round(sparsity * numel) zeros at random places (+ some all-zero rows)."""
    w = torch.randn(*shape, generator=gen)
    flat = w.view(-1)
    nzero = int(round(sparsity * flat.numel()))
    if nzero:
        flat[torch.randperm(flat.numel(), generator=gen)[:nzero]] = 0.0
    if empty_rows:
        w[torch.randperm(shape[0], generator=gen)[:empty_rows]] = 0.0
    return w


def linear_codes(weight: torch.Tensor, bits: int):
    """Symmetric per-output-channel linear quantization: (codes, scale, zero_point), zeros stay zero."""
    rows = weight.shape[0]
    qmax = 2 ** (bits - 1) - 1
    amax = weight.reshape(rows, -1).abs().amax(dim=1).clamp_min(1e-8)
    scale = amax / qmax
    shape = (rows,) + (1,) * (weight.dim() - 1)
    zp = 2 ** (bits - 1)
    codes = (torch.round(weight / scale.reshape(shape)).clamp(-qmax, qmax) + zp).to(torch.int32)
    return codes, scale, torch.full((rows,), zp, dtype=torch.int32)


def codebook_codes(weight: torch.Tensor, bits: int, gen: torch.Generator):
    """Nearest-level codes against a random sorted codebook whose level 0 is exactly 0.0."""
    levels = torch.sort(torch.randn(2**bits, generator=gen)).values * weight.abs().max()
    levels[0] = 0.0
    dist = (weight.reshape(-1, 1) - levels[1:].reshape(1, -1)).abs()
    codes = (dist.argmin(dim=1) + 1).reshape(weight.shape).to(torch.int32)
    codes[weight == 0] = 0
    return codes, levels


def random_layer(shape: Sequence[int], sparsity: float, *, value: str = "float32", bits: Optional[int] = None,
                 stride: int = 1, padding: int = 0, bias: bool = True, empty_rows: int = 0,
                 seed: int = 0) -> PackedLayer:
    """A random PackedLayer. value: float32 | float16 | linear | codebook (the last two need bits)."""
    gen = torch.Generator().manual_seed(seed)
    w = random_sparse_weight(shape, sparsity, gen, empty_rows)
    b = torch.randn(shape[0], generator=gen) if bias else None
    if value in ("float32", "float16"):
        return pack_weight(w, b, stride=stride, padding=padding,
                           value_dtype=torch.float32 if value == "float32" else torch.float16)
    if value == "linear":
        codes, scale, zp = linear_codes(w, bits)
        return pack_weight(w, b, stride=stride, padding=padding, bits=bits, codes=codes, scale=scale, zero_point=zp)
    if value == "codebook":
        codes, levels = codebook_codes(w, bits, gen)
        return pack_weight(w, b, stride=stride, padding=padding, bits=bits, codes=codes, codebook=levels)
    raise ValueError(f"value: expected float32, float16, linear or codebook, got {value!r}")


# ---------------------------------------------------------------------------------------
# timing


@dataclass
class Timing:
    median_us: float
    spread_us: float  # interquartile range
    samples: int
    graph: bool


def time_graph(fn: Callable[[int], object], n_inputs: int, samples: int = 15, warmup: int = 3) -> Timing:
    """Median time of one ``fn(i)`` call. The calls for all inputs i are captured in one CUDA graph (no launch
    gaps; rotating inputs keep L2 from serving every read) and the graph is replayed ``samples`` times between
    CUDA events. Falls back to eager launches if capture fails (e.g. a library that syncs)."""
    for i in range(n_inputs):  # eager warm-up: autotuning, workspace allocation, lazy init
        fn(i)
    torch.cuda.synchronize()
    graph = None
    try:
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            with torch.cuda.graph(g, stream=stream):
                for i in range(n_inputs):
                    fn(i)
        torch.cuda.current_stream().wait_stream(stream)
        graph = g
    except Exception:  # noqa: BLE001 - any capture failure means: time eagerly
        torch.cuda.synchronize()

    def run_once():
        if graph is not None:
            graph.replay()
        else:
            for i in range(n_inputs):
                fn(i)

    for _ in range(warmup):
        run_once()
    times = []
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(samples):
        start.record()
        run_once()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1000.0 / n_inputs)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return Timing(statistics.median(times), q[2] - q[0], len(times), graph is not None)


def n_rotations(bytes_per_input: int, l2_bytes: int = 60 * 2**20) -> int:
    """Enough input copies that one pass over them is >= 3x the L2 (at least 2, at most 16)."""
    return int(min(16, max(2, math.ceil(3 * l2_bytes / max(1, bytes_per_input)))))


# ---------------------------------------------------------------------------------------
# backends: each returns fn(i) over prepared inputs


def _set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def backend_cudnn(dtype: torch.dtype, tf32: bool, channels_last: bool):
    def make(shape: ConvShape, xs: List[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor):
        _set_tf32(tf32)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        xin = [x.to(dtype).contiguous(memory_format=fmt) for x in xs]
        w = weight.to(dtype).contiguous(memory_format=fmt)
        b = bias.to(dtype)
        return lambda i: F.conv2d(xin[i], w, b, stride=shape.stride, padding=shape.padding)
    return make


def backend_csr_spmm(shape: ConvShape, xs: List[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor):
    """torch CSR (cuSPARSE) SpMM over im2col: unfold, W_csr @ cols, bias, back to NCHW."""
    _set_tf32(False)
    w_csr = weight.reshape(shape.cout, -1).to_sparse_csr()
    oh = shape.out_hw

    def fn(i):
        x = xs[i]
        cols = F.unfold(x, shape.k, padding=shape.padding, stride=shape.stride)  # [N, CKK, L]
        b = cols.permute(1, 0, 2).reshape(cols.shape[1], -1)  # [CKK, N*L]
        y = torch.sparse.mm(w_csr, b) + bias[:, None]  # [CO, N*L]
        return y.reshape(shape.cout, x.shape[0], oh, oh).permute(1, 0, 2, 3).contiguous()
    return fn


BASELINES: Dict[str, Callable] = {
    "cudnn_fp32": backend_cudnn(torch.float32, tf32=False, channels_last=False),
    "cudnn_tf32": backend_cudnn(torch.float32, tf32=True, channels_last=False),
    "cudnn_fp16": backend_cudnn(torch.float16, tf32=False, channels_last=True),
}


def backend_direct_sparse(layer: PackedLayer, variant: str = "auto", act_dtype=torch.float32):
    def make(shape: ConvShape, xs: List[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor):
        xin = [x.to(act_dtype) for x in xs]
        outs = [torch.empty((x.shape[0], shape.cout, shape.out_hw, shape.out_hw), device=x.device, dtype=act_dtype)
                for x in xs]
        return lambda i: sparse_conv2d_into(outs[i], xin[i], layer, variant=variant)
    return make


# ---------------------------------------------------------------------------------------
# the sweep

CSV_COLUMNS = ["layer", "kind", "in_shape", "out_channels", "kernel", "stride", "sparsity", "bits", "backend",
               "batch", "time_us", "spread_us", "speedup_vs_cudnn_fp32", "speedup_vs_cudnn_tf32",
               "speedup_vs_cudnn_fp16", "speedup_vs_csr_spmm", "gflops_effective", "weight_bytes", "rel_err",
               "plan", "graph"]


def _rel_err(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, shape: ConvShape) -> float:
    ref = F.conv2d(x.double(), weight.double(), bias.double(), stride=shape.stride, padding=shape.padding)
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def run_sweep(layers: Sequence[ConvShape], batches: Sequence[int], sparsities: Sequence[float],
              bits_list: Sequence[int], *, samples: int = 15, variants: Sequence[str] = ("auto",),
              baselines: Iterable[str] = ("cudnn_fp32", "cudnn_tf32", "cudnn_fp16", "csr_spmm"),
              log: Callable[[str], None] = print, seed: int = 0) -> List[dict]:
    """Time every layer x batch x sparsity x bits; one row per backend (the CSV_COLUMNS)."""
    from sparsebench.sparse.ops import kernel_plan

    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    baselines = list(baselines)
    rows: List[dict] = []
    for shape in layers:
        for batch in batches:
            gen = torch.Generator().manual_seed(seed)
            in_bytes = batch * shape.cin * shape.hw**2 * 4
            xs = [torch.randn(batch, shape.cin, shape.hw, shape.hw, generator=gen).to(dev)
                  for _ in range(n_rotations(in_bytes))]
            dense_w = torch.randn(shape.cout, shape.cin, shape.k, shape.k, generator=gen).to(dev)
            dense_b = torch.randn(shape.cout, generator=gen).to(dev)
            base = dict(layer=shape.name, kind="conv2d", in_shape=f"{shape.cin}x{shape.hw}x{shape.hw}",
                        out_channels=shape.cout, kernel=f"{shape.k}x{shape.k}", stride=shape.stride, batch=batch)
            ref_t: Dict[str, float] = {}
            group: List[dict] = []
            for name in baselines:
                if name == "csr_spmm":
                    continue
                t = time_graph(BASELINES[name](shape, xs, dense_w, dense_b), len(xs), samples)
                ref_t[name] = t.median_us
                group.append(dict(base, sparsity=0.0, bits=16 if "fp16" in name else 32, backend=name,
                                  time_us=t.median_us, spread_us=t.spread_us, weight_bytes=dense_w.numel() * 4,
                                  gflops_effective=shape.flops(batch) / t.median_us / 1e3, rel_err="",
                                  plan="", graph=t.graph))
            _set_tf32(False)
            for s in sparsities:
                csr_t = None
                w_s = None
                for bits in bits_list:
                    value = "float32" if bits == 32 else ("float16" if bits == 16 else "linear")
                    layer = random_layer((shape.cout, shape.cin, shape.k, shape.k), s, value=value,
                                         bits=None if bits in (32, 16) else bits, stride=shape.stride,
                                         padding=shape.padding, seed=seed + int(s * 1000) + bits).to(dev)
                    w_deq, b = layer.dequantize(), layer.bias
                    if w_s is None:
                        w_s = w_deq
                    if csr_t is None and "csr_spmm" in baselines:
                        t = time_graph(backend_csr_spmm(shape, xs, w_s, b), len(xs), samples)
                        csr_t = t.median_us
                        group.append(dict(base, sparsity=s, bits=32, backend="csr_spmm", time_us=t.median_us,
                                          spread_us=t.spread_us, weight_bytes=layer.nnz * 12 + 4 * (shape.cout + 1),
                                          gflops_effective=shape.flops(batch) / t.median_us / 1e3, rel_err="",
                                          plan="", graph=t.graph))
                    for variant in variants:
                        make = backend_direct_sparse(layer, variant)
                        fn = make(shape, xs, w_deq, b)
                        out = fn(0)
                        err = _rel_err(out, xs[0], w_deq, b, shape) if batch == min(batches) else ""
                        t = time_graph(fn, len(xs), samples)
                        plan = kernel_plan(tuple(xs[0].shape), layer, variant)
                        pl = (f"{plan['variant']}:R{plan['rows_per_block']}" +
                              (f"/V{plan['V']}/{plan['NI']}x{plan['TH']}x{plan['TW']}/CC{plan['CC']}x{plan['chunks']}"
                               f"/B{plan['blocks']}" if plan["variant"] == "stage" else ""))
                        backend = "direct_sparse" if variant == "auto" else f"direct_sparse[{variant}]"
                        group.append(dict(base, sparsity=s, bits=bits, backend=backend, time_us=t.median_us,
                                          spread_us=t.spread_us, weight_bytes=layer.footprint_bytes(),
                                          gflops_effective=shape.flops(batch) / t.median_us / 1e3, rel_err=err,
                                          plan=pl, graph=t.graph, _csr=csr_t))
                    del layer
            for r in group:
                for name in ("cudnn_fp32", "cudnn_tf32", "cudnn_fp16"):
                    r[f"speedup_vs_{name}"] = ref_t[name] / r["time_us"] if name in ref_t else ""
                csr = r.pop("_csr", None)
                if r["backend"] == "csr_spmm":
                    csr = r["time_us"]
                r["speedup_vs_csr_spmm"] = csr / r["time_us"] if csr else ""
            mine = [r for r in group if r["backend"] == "direct_sparse"]
            if mine:
                log(f"{shape.name:22s} b{batch:<4d} " + " ".join(
                    f"s{r['sparsity']:.2f}/{r['bits']}b:{r['time_us']:.1f}us" for r in mine[:: max(1, len(bits_list))]) +
                    "  cudnn fp32/tf32/fp16: " + "/".join(f"{ref_t.get(n, float('nan')):.1f}" for n in
                                                           ("cudnn_fp32", "cudnn_tf32", "cudnn_fp16")))
            rows.extend(group)
            del xs
            torch.cuda.empty_cache()
    return rows


def geomean(values: Iterable[float]) -> float:
    vals = [v for v in values if isinstance(v, (int, float)) and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else float("nan")


def summarize(rows: List[dict], backend: str = "direct_sparse") -> List[dict]:
    """Geomean speedups per (sparsity, bits, batch) of one backend vs each baseline; and the minimum vs fp32."""
    keys = sorted({(r["sparsity"], r["bits"], r["batch"]) for r in rows if r["backend"] == backend})
    out = []
    for s, bits, batch in keys:
        sel = [r for r in rows if r["backend"] == backend and r["sparsity"] == s and r["bits"] == bits
               and r["batch"] == batch]
        out.append({"sparsity": s, "bits": bits, "batch": batch, "layers": len(sel),
                    **{f"gm_vs_{b}": geomean(r[f"speedup_vs_{b}"] for r in sel)
                       for b in ("cudnn_fp32", "cudnn_tf32", "cudnn_fp16", "csr_spmm")},
                    "min_vs_cudnn_fp32": min((r["speedup_vs_cudnn_fp32"] for r in sel
                                              if isinstance(r["speedup_vs_cudnn_fp32"], float)), default=float("nan")),
                    "min_vs_csr_spmm": min((r["speedup_vs_csr_spmm"] for r in sel
                                            if isinstance(r["speedup_vs_csr_spmm"], float)), default=float("nan"))})
    return out


def write_csv(path: str, rows: List[dict]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
    os.replace(tmp, path)


def format_summary(summary: List[dict]) -> str:
    head = (f"{'sparsity':>8} {'bits':>4} {'batch':>5} {'n':>3} {'vs fp32':>8} {'vs tf32':>8} {'vs fp16':>8} "
            f"{'vs csr':>8} {'min fp32':>8} {'min csr':>8}")
    lines = [head]
    for s in summary:
        lines.append(f"{s['sparsity']:>8.2f} {s['bits']:>4} {s['batch']:>5} {s['layers']:>3} "
                     f"{s['gm_vs_cudnn_fp32']:>8.2f} {s['gm_vs_cudnn_tf32']:>8.2f} {s['gm_vs_cudnn_fp16']:>8.2f} "
                     f"{s['gm_vs_csr_spmm']:>8.2f} {s['min_vs_cudnn_fp32']:>8.2f} {s['min_vs_csr_spmm']:>8.2f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Benchmark the direct sparse conv kernels against cuDNN and torch CSR SpMM.")
    p.add_argument("--out", default="bench.csv", help="CSV file to write (atomically)")
    p.add_argument("--batches", default="1,32,128")
    p.add_argument("--sparsities", default="0.8,0.9,0.95,0.98")
    p.add_argument("--bits", default="32,8,4", help="weight bits: 32 (fp32 values), 16 (fp16 values), 8/4/2 (codes)")
    p.add_argument("--layers", default="", help="comma-separated substrings of layer names (default: all)")
    p.add_argument("--variants", default="auto", help="kernel variants to time: auto,stage,rowsplit")
    p.add_argument("--baselines", default="cudnn_fp32,cudnn_tf32,cudnn_fp16,csr_spmm")
    p.add_argument("--samples", type=int, default=15)
    p.add_argument("--tuning", default="", help="dispatcher knobs, e.g. smem_budget=65536,rowsplit_max_pixels=256,blocks_per_sm=2")
    args = p.parse_args(argv)
    if not kernels_available():
        from sparsebench.sparse.ops import kernels_unavailable_reason
        print(f"error: backend direct_sparse needs a CUDA GPU and the compiled sparsebench._C module; "
              f"{kernels_unavailable_reason()}", file=sys.stderr)
        return 2
    if args.tuning:
        from sparsebench import _C
        knobs = dict(_C.get_tuning())
        for kv in args.tuning.split(","):
            k, v = kv.split("=")
            if k not in knobs:
                print(f"error: --tuning key {k!r} unknown; allowed: {sorted(knobs)}", file=sys.stderr)
                return 2
            knobs[k] = int(v)
        _C.set_tuning(**knobs)
    wanted = [s for s in args.layers.split(",") if s]
    layers = [l for l in LAYERS if not wanted or any(w in l.name for w in wanted)]
    t0 = time.time()
    rows = run_sweep(layers, [int(b) for b in args.batches.split(",")],
                     [float(s) for s in args.sparsities.split(",")], [int(b) for b in args.bits.split(",")],
                     samples=args.samples, variants=args.variants.split(","),
                     baselines=[b for b in args.baselines.split(",") if b])
    write_csv(args.out, rows)
    print(f"\n{len(rows)} rows in {time.time() - t0:.0f} s -> {args.out}; {torch.cuda.get_device_name()}")
    for v in args.variants.split(","):
        backend = "direct_sparse" if v == "auto" else f"direct_sparse[{v}]"
        print(f"\ngeomean speedup of {backend} (n = layers):")
        print(format_summary(summarize(rows, backend)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
