"""Kernel development bench: our tensor-core plans against our CUDA-core plans and cuDNN fp16, per layer.

For every layer of the benchmark set, sparsity, batch and weight format: each output is checked
against float64 torch first, then every distinct plan of each family is timed as the harness times
(median of CUDA-event runs, L2 flushed before each) and the family's fastest is kept, as the
autotuner would. cuDNN runs fp16 channels_last with cudnn.benchmark. Writes a CSV and prints geomeans.

    python scripts/bench_tensor.py --out bench_tensor.csv [--sparsities 0.9 0.95] [--batches 1 32 128]
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from sparsebench.bench.measure import fp16_tensor_peak_tflops
from sparsebench.sparse import ops
from sparsebench.sparse.pairs import GROUPS, mma_ratio
from sparsebench.sparse.split import SPLIT
from sparsebench.sparse.split import mma_ratio as split_mma_ratio
from sparsebench.sparse.synthetic import random_layer
from sparsebench.sparse.timing import time_cuda

# A plan's `pairs`: dense MMAs, the 2:4 stream of that many groups a k-step, or the implicit-GEMM kernel (SPLIT) on
# mma.sync or on Hopper's wgmma (WGMMA: both halves; WGMMA_WARP: the second halves by mma.sync, a warp its own).
WGMMA, WGMMA_WARP = "wgmma", "wgmma_warp"
MMA_KINDS = (0, *GROUPS, SPLIT, WGMMA, WGMMA_WARP)
KIND_NAMES = {
    0: "dense_mma",
    1: "pairs",
    2: "pairs2",
    4: "pairs4",
    SPLIT: "gemm",
    WGMMA: "wgmma",
    WGMMA_WARP: "wgmma_warp",
}

LAYERS = [  # (name, c_in, c_out, kernel, hw, stride)
    ("vgg.conv1", 3, 64, 3, 32, 1),
    ("vgg.conv2", 64, 64, 3, 32, 1),
    ("vgg.conv3", 64, 128, 3, 16, 1),
    ("vgg.conv4", 128, 128, 3, 16, 1),
    ("vgg.conv5", 128, 256, 3, 8, 1),
    ("vgg.conv6", 256, 256, 3, 8, 1),
    ("vgg.conv8", 256, 512, 3, 4, 1),
    ("vgg.conv9", 512, 512, 3, 4, 1),
    ("vgg.conv11", 512, 512, 3, 2, 1),
    ("r50.3x3_64@56", 64, 64, 3, 56, 1),
    ("r50.3x3_128@28", 128, 128, 3, 28, 1),
    ("r50.3x3_256@14", 256, 256, 3, 14, 1),
    ("r50.3x3_512@7", 512, 512, 3, 7, 1),
    ("r50.1x1_64-256@56", 64, 256, 1, 56, 1),
    ("r50.1x1_256-64@56", 256, 64, 1, 56, 1),
    ("r50.1x1_512-128@28", 512, 128, 1, 28, 1),
    ("r50.1x1_1024-256@14", 1024, 256, 1, 14, 1),
    ("r50.1x1_2048-512@7", 2048, 512, 1, 7, 1),
    ("r50.3x3s2_128@56", 128, 128, 3, 56, 2),
]


def check(y, x, layer):
    w = layer.dequantize().double()
    ref = F.conv2d(x.double(), w, layer.bias.double(), stride=layer.stride, padding=layer.padding)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    if not err <= 1e-2 or torch.isnan(y).any():
        raise AssertionError(f"relative error {err:.3g}")
    return err


def best_of(x, layer, family, repeats):
    """(median us, plan id, plan name) of the fastest distinct plan of ``family`` ('tensor' or CUDA cores),
    and by MMA kind: ``{0: the fastest on dense MMAs, G: on the sparse MMAs (the 2:4 stream of G groups a
    k-step)}``."""
    cl = ops.is_channels_last(x)
    best = {g: (math.inf, None, "") for g in MMA_KINDS}
    _, shape = ops._geometry(x, layer)
    out = ops._empty_out(x, shape)
    for plan in ops.distinct_plans(x.shape, layer, dtype=x.dtype, channels_last=cl, tensor=family == "tensor"):
        p = ops.kernel_plan(x.shape, layer, plan=plan, dtype=x.dtype, channels_last=cl)
        run = functools.partial(ops._launch_into, out, x, layer, False, 0, plan)
        try:
            out.fill_(float("nan"))
            run()
            check(out, x, layer)
        except (AssertionError, RuntimeError) as e:
            print(f"  WRONG {family} plan {plan} ({ops.plan_name(p)}) on {tuple(x.shape)}: {e}", flush=True)
            continue
        t = time_cuda([run], warmup=2, repeats=repeats, device=x.device).median_us
        kind = (None, WGMMA, WGMMA_WARP)[p["wgmma"]] if p.get("wgmma") else p.get("pairs", 0)
        if t < best[kind][0]:
            best[kind] = (t, plan, ops.plan_name(p))
    return min(best.values(), key=lambda b: b[0]), best


def geomean(rows, key: str) -> float:
    values = [r[key] for r in rows if r[key] != ""]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else math.nan


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_tensor.csv")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--weights", nargs="+", default=["fp16", "linear4"])
    ap.add_argument("--layers", nargs="*", default=None, help="layer names (default: all)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-cuda-cores", action="store_true", help="skip our CUDA-core plans")
    ap.add_argument("--no-wgmma", action="store_true", help="leave the implicit GEMM's wgmma tiles out (tc_wgmma=0)")
    ap.add_argument(
        "--budget-s", type=float, default=None, help="start no new layer after this many seconds (the summary follows)"
    )
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense fp16 peak (default: by its name)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    peak = args.peak_tflops or fp16_tensor_peak_tflops(dev) or math.nan
    torch.backends.cudnn.benchmark = True
    if not args.no_wgmma:
        ops._module("bench_tensor").set_tuning(tc_wgmma=1)  # time the wgmma tiles too (off by default)
    rows = []
    t0 = time.time()
    layers = [shape for shape in LAYERS if args.layers is None or shape[0] in args.layers]
    for name, cin, cout, k, hw, stride in layers:
        if args.budget_s is not None and time.time() - t0 > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: stopped before {name}", flush=True)
            break
        for sparsity in args.sparsities:
            for weights in args.weights:
                kind = dict(value="float16") if weights == "fp16" else dict(value="linear", bits=int(weights[-1]))
                layer = random_layer((cout, cin, k, k), sparsity, padding=k // 2, stride=stride, seed=1, **kind).to(dev)
                taps = int(layer.tile_kptr[-1]) / (layer.tile_groups * layer.row_length)
                # Each stream's MMAs over the dense-MMA stream's.
                mma_ratios = {0: 1.0, **{g: mma_ratio(layer, g) for g in GROUPS}}
                # The implicit-GEMM kernels run every tap of every group: their ratio to a dense layer, rescaled.
                rescale = layer.tile_groups * layer.row_length / max(1, int(layer.tile_kptr[-1]))
                mma_ratios[SPLIT] = split_mma_ratio(layer) * rescale
                mma_ratios[WGMMA] = split_mma_ratio(layer, warpgroup=True) * rescale
                mma_ratios[WGMMA_WARP] = mma_ratios[SPLIT]
                for batch in args.batches:
                    x = torch.randn(batch, cin, hw, hw, device=dev, dtype=torch.float16)
                    xl = x.contiguous(memory_format=torch.channels_last)
                    wd = layer.dequantize().to(dev, torch.float16).contiguous(memory_format=torch.channels_last)
                    b = layer.bias.to(dev, torch.float16)
                    dense = functools.partial(F.conv2d, xl, wd, b, stride=stride, padding=k // 2)
                    cudnn = time_cuda(
                        [dense],
                        warmup=3,
                        repeats=args.repeats,
                        device=dev,
                    ).median_us
                    tc, tc_kinds = best_of(x, layer, "tensor", args.repeats)
                    tcl, tcl_kinds = best_of(xl, layer, "tensor", args.repeats)
                    cc = (math.nan, None, "") if args.no_cuda_cores else best_of(x, layer, "cuda", args.repeats)[0]
                    kind_us = {g: min(tc_kinds[g][0], tcl_kinds[g][0]) for g in MMA_KINDS}
                    pixels = batch * (hw // stride) ** 2
                    flops = 2.0 * layer.nnz * pixels  # the real (nonzero) work
                    tc_us = min(tc[0], tcl[0])
                    fastest = min(MMA_KINDS, key=lambda g: kind_us[g])
                    # Every MMA issued (16 channels a group) as dense m16n8k16s: a sparse m16n8k32 (32 taps,
                    # half of them stored) takes the tensor cores as long as one.
                    mma_flops = 2.0 * 16 * int(layer.tile_kptr[-1]) * pixels * mma_ratios[fastest]
                    by_kind = {
                        f"speedup_tc_{KIND_NAMES[g]}": round(cudnn / kind_us[g], 3) if kind_us[g] < math.inf else ""
                        for g in MMA_KINDS
                    }
                    row = dict(
                        layer=name,
                        sparsity=sparsity,
                        weights=weights,
                        batch=batch,
                        taps=round(taps, 3),
                        cudnn_fp16_us=round(cudnn, 2),
                        tc_nchw_us=round(tc[0], 2),
                        tc_nhwc_us=round(tcl[0], 2),
                        cuda_core_us=round(cc[0], 2),
                        tc_plan=tc[2],
                        tc_nhwc_plan=tcl[2],
                        cc_plan=cc[2],
                        speedup_tc=round(cudnn / min(tc[0], tcl[0]), 3),
                        **by_kind,
                        speedup_cc=round(cudnn / cc[0], 3) if cc[1] is not None else "",
                        speedup_best=round(cudnn / min(tc[0], tcl[0], cc[0] if cc[1] is not None else math.inf), 3),
                        tflops_real=round(flops / tc_us / 1e6, 1),
                        tflops_mma=round(mma_flops / tc_us / 1e6, 1),
                        peak_real=round(flops / tc_us / 1e6 / peak, 4),
                        peak_mma=round(mma_flops / tc_us / 1e6 / peak, 4),
                    )
                    rows.append(row)
                    print(" ".join(f"{v}" for v in row.values()), flush=True)
    if not rows:
        print("no case ran (--budget-s spent before the first layer)")
        return 1
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    done = len({r["layer"] for r in rows})
    print(f"\n{len(rows)} cases ({done} layers) in {time.time() - t0:.0f} s; geomean speedup over cuDNN fp16 NHWC:")
    print(f"(tensor cores: median fraction of the dense fp16 peak, {peak:g} TFLOP/s, in real work and in MMAs issued)")
    print(
        "sparsity weights batch  tensor-core  (dense MMAs  2:4 MMAs  2:4 x2  2:4 x4  gemm  wgmma  wgmma-warp)"
        "  cuda-core  faster of the two  peak real  peak MMA"
    )
    for sparsity in args.sparsities:
        for weights in args.weights:
            for batch in args.batches:
                sel = [r for r in rows if r["sparsity"] == sparsity and r["weights"] == weights and r["batch"] == batch]
                tc, cc, best = (geomean(sel, k) for k in ("speedup_tc", "speedup_cc", "speedup_best"))
                dense, p1, p2, p4, gemm, wgmma, warp = (geomean(sel, f"speedup_tc_{KIND_NAMES[g]}") for g in MMA_KINDS)
                shares = [(r["peak_real"], r["peak_mma"]) for r in sel]
                real, mma = map(statistics.median, zip(*shares)) if shares else (math.nan, math.nan)
                kinds = f"{dense:10.3f}  {p1:8.3f}  {p2:6.3f}  {p4:6.3f}  {gemm:5.3f}  {wgmma:5.3f}  {warp:10.3f}"
                speedups = f"{tc:11.3f}  ({kinds})  {cc:9.3f}  {best:17.3f}"
                print(f"{sparsity:8} {weights:7} {batch:5}  {speedups}  {real:9.2%}  {mma:8.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
