"""A small set of tensor-core launches for compute-sanitizer: every distinct tensor-core plan of a few
shapes that reach each staging path (one window per band, images side by side, the general strided
copy), split-K reduction, several chunks, and each value kind, on dense MMAs and on the 2:4 stream.
Each output is checked against float64 torch; exits 1 on a wrong one.

    compute-sanitizer --tool memcheck --kernel-name kns=conv_tensor_kernel python scripts/sanitize_tensor.py
    compute-sanitizer --tool racecheck --kernel-name kns=conv_tensor_kernel python scripts/sanitize_tensor.py --quick
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from sparsebench import _C
from sparsebench.sparse.ops import distinct_plans, kernel_plan, sparse_conv2d_into
from sparsebench.sparse.synthetic import random_layer

CASES = [  # (weight shape, stride, padding, input shape, value, bits, channels_last, staging budget or None)
    ((40, 19, 3, 3), 1, 1, (3, 19, 9, 20), "float16", None, False, None),  # one image a band: the window
    ((40, 19, 3, 3), 1, 1, (9, 19, 6, 5), "float16", None, True, None),  # narrow images side by side
    ((33, 24, 3, 3), 2, 1, (4, 24, 11, 11), "linear", 4, False, None),  # stride 2: the general copy
    ((24, 130, 1, 1), 1, 0, (2, 130, 7, 7), "codebook", 4, True, None),  # many taps, few pixels: split K
    ((20, 64, 5, 5), 1, 2, (2, 64, 8, 8), "linear", 8, False, 24 * 1024),  # several chunks, straddling k-steps
    ((20, 64, 5, 5), 1, 2, (2, 64, 8, 8), "linear", 8, False, 32 * 1024),  # the same for the 2:4 stream's ring
    # A 4-level codebook of 4-bit codes, few k-steps a group: warps with no step (split K) decode stages
    # no fetch wrote, whose codes must stay inside the codebook.
    ((20, 8, 3, 3), 1, 1, (2, 8, 6, 6), "few_levels", 4, False, None),
]


def few_level_codebook_layer(wshape, bits: int, pad: int):
    from sparsebench.sparse.format import pack_weight

    gen = torch.Generator().manual_seed(3)
    book = torch.tensor([0.0, -1.0, 0.5, 1.0])
    codes = torch.randint(0, len(book), wshape, generator=gen)
    bias = torch.randn(wshape[0], generator=gen)
    layer = pack_weight(book[codes], bias, padding=pad, bits=bits, codes=codes, codebook=book)
    return layer.to("cuda")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two plans a case and MMA kind (racecheck is slow)")
    args = ap.parse_args()
    wrong = launches = 0
    for wshape, stride, pad, xshape, value, bits, channels_last, budget in CASES:
        _C.set_tuning(**({"tc_smem_budget": budget} if budget else {}))
        if value == "few_levels":
            layer = few_level_codebook_layer(wshape, bits, pad)
        else:
            layer = random_layer(wshape, 0.9, value=value, bits=bits, stride=stride, padding=pad, seed=7).to("cuda")
        x = torch.randn(xshape, device="cuda", dtype=torch.float16)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        w = layer.dequantize().double()
        ref = F.conv2d(x.double(), w, layer.bias.double(), stride=stride, padding=pad)
        plans = distinct_plans(x.shape, layer, dtype=x.dtype, channels_last=channels_last, tensor=True)
        if args.quick:
            by_kind = {}
            for plan in plans:
                p = kernel_plan(x.shape, layer, plan=plan, dtype=x.dtype, channels_last=channels_last)
                by_kind.setdefault(p["pairs"], []).append(plan)
            plans = [plan for kind in by_kind.values() for plan in kind[:2]]
        for plan in plans:
            layer.tuned_plans = {(tuple(x.shape), x.dtype, x.device.index, channels_last): plan}
            out = torch.full(ref.shape, float("nan"), device="cuda", dtype=x.dtype)
            if channels_last:
                out = out.contiguous(memory_format=torch.channels_last)
            sparse_conv2d_into(out, x, layer)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            launches += 1
            if not err <= 1e-2:
                wrong += 1
                print(f"WRONG {wshape} {xshape} plan {plan}: relative error {err:.3g}")
    _C.set_tuning()
    torch.cuda.synchronize()
    print(f"{launches} tensor-core launches, {wrong} wrong")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
