#!/usr/bin/env bash
# The paper study's grid for one experiment config, into one sweep directory, every job
# compressed from one shared dense pre-training, then the report:
#   scripts/paper_study.sh paper_vgg16_cifar10 [more overrides, e.g. data.path=...]
# Grid: sparsity {0, 0.8, 0.9, 0.95} x weights {fp32, 8-bit linear, 4-bit linear, 4-bit k-means}.
# SWEEP_DIR sets the directory (default multirun/<experiment>/<time>).
set -euo pipefail
experiment=${1:?usage: scripts/paper_study.sh EXPERIMENT [overrides...]}
shift
dir=${SWEEP_DIR:-multirun/$experiment/$(date +%Y-%m-%d_%H-%M-%S)}
status=0
sweep() { sparsebench -m "experiment=$experiment" trainer.init_from=shared "hydra.sweep.dir=$dir" "$@" "${extra[@]}" || status=1; }
extra=("$@")

sweep prune=none quant=none quant.bits=32                      # the dense fp32 reference
sweep prune=none quant=linear quant.bits=8,4
sweep prune=none quant=kmeans quant.bits=4
sweep prune.final_sparsity=0.8,0.9,0.95 quant=none quant.bits=32
sweep prune.final_sparsity=0.8,0.9,0.95 quant=linear quant.bits=8,4
sweep prune.final_sparsity=0.8,0.9,0.95 quant=kmeans quant.bits=4
sparsebench-report "$dir"
exit $status
