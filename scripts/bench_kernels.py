#!/usr/bin/env python3
"""Kernel benchmark: direct sparse conv vs cuDNN fp32/TF32/fp16 and torch CSR SpMM (needs a CUDA GPU).

    python3 scripts/bench_kernels.py --out bench.csv [--batches 1,32,128] [--sparsities 0.8,0.9,0.95,0.98]
                                      [--bits 32,8,4] [--layers vgg,r50] [--variants auto,tile,rowsplit]

The timing and case generation live in sparsebench/sparse/bench.py (importable by the harness).
"""

import sys

from sparsebench.sparse.bench import main

if __name__ == "__main__":
    sys.exit(main())
