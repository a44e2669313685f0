#!/usr/bin/env python3
"""Per-channel against per-layer k-means codebooks (and 4-bit linear codes) through the direct sparse kernels.

    python scripts/compare_codebooks.py [--sparsity 0.9]

Random layers of VGG-16's CIFAR shapes; each call of sparse_conv2d is timed eagerly with
torch.utils.benchmark (medians), so the times include the op's host overhead; the ratio
per-channel / per-layer is what to read. Each output is checked against the dense decode.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from sparsebench.sparse.ops import sparse_conv2d
from sparsebench.sparse.synthetic import random_layer

SHAPES = [((128, 64, 3, 3), 16), ((256, 128, 3, 3), 8), ((512, 256, 3, 3), 4), ((512, 512, 3, 3), 2)]
KINDS = {"linear4": dict(value="linear", bits=4), "kmeans4": dict(value="codebook", bits=4),
         "kmeans4 per channel": dict(value="codebook", bits=4, per_channel=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args()
    for batch in (1, 64):
        for shape, hw in SHAPES:
            x = torch.randn(batch, shape[1], hw, hw, device="cuda")
            times = {}
            for name, kind in KINDS.items():
                layer = random_layer(shape, args.sparsity, padding=1, **kind).to("cuda")
                ref = F.conv2d(x.double(), layer.dequantize().double(), layer.bias.double(), padding=1)
                err = ((sparse_conv2d(x, layer).double() - ref).abs().max() / ref.abs().max()).item()
                assert err < 1e-4, f"{name}: relative error {err:.2g}"
                timer = benchmark.Timer("f(x, layer)", globals=dict(f=sparse_conv2d, x=x, layer=layer))
                times[name] = timer.blocked_autorange(min_run_time=0.3).median * 1e6
            ratio = times["kmeans4 per channel"] / times["kmeans4"]
            print(f"batch {batch:2d} {str(shape):18s} {hw:2d}x{hw:<2d} " +
                  "  ".join(f"{k} {t:6.1f} us" for k, t in times.items()) + f"  per channel / per layer {ratio:.2f}")


if __name__ == "__main__":
    main()
