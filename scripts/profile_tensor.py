"""Run one layer's tensor-core plan a few times, for a profiler to watch: the fastest tensor-core plan
(timed here first, outside the profiled range) or a given candidate id. Prints the plan it ran.

    ncu --profile-from-start off --set full --import-source yes -k regex:conv_tensor -c 1 -o tc \\
        python scripts/profile_tensor.py --layer 256,256,3,14,128 --sparsity 0.9
    ncu -i tc.ncu-rep --page source --csv --print-source sass > tc_sass.csv   # stalls per instruction
"""

from __future__ import annotations

import argparse

import torch

from sparsebench.sparse.ops import distinct_plans, kernel_plan, plan_name, sparse_conv2d
from sparsebench.sparse.synthetic import random_layer
from sparsebench.sparse.timing import time_cuda


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", default="256,256,3,14,128", help="c_out,c_in,kernel,hw,batch (padding kernel//2)")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--weights", choices=["float16", "linear"], default="float16")
    ap.add_argument("--plan", type=int, default=None, help="a candidate id (default: the fastest tensor-core plan)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    cout, cin, k, hw, batch = (int(v) for v in args.layer.split(","))
    bits = 4 if args.weights == "linear" else None
    layer = random_layer((cout, cin, k, k), args.sparsity, value=args.weights, bits=bits, padding=k // 2, seed=1)
    layer = layer.to("cuda")
    x = torch.randn(batch, cin, hw, hw, device="cuda", dtype=torch.float16)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    key = (tuple(x.shape), x.dtype, x.device.index, args.channels_last)

    def plan_of(candidate: int) -> dict:
        return kernel_plan(x.shape, layer, plan=candidate, dtype=x.dtype, channels_last=args.channels_last)

    def run_plan(candidate: int):
        layer.tuned_plans = {key: candidate}
        return sparse_conv2d(x, layer)

    plan = args.plan
    if plan is None:
        candidates = distinct_plans(x.shape, layer, dtype=x.dtype, channels_last=args.channels_last, tensor=True)
        times = {c: time_cuda([lambda c=c: run_plan(c)], warmup=2, repeats=10).median_us for c in candidates}
        plan = min(times, key=times.get)
        print(f"fastest of {len(candidates)} tensor-core plans: {times[plan]:.1f} us", flush=True)
    print(f"plan {plan}: {plan_name(plan_of(plan))}", flush=True)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()  # ncu --profile-from-start off watches only these launches
    for _ in range(args.runs):
        run_plan(plan)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
