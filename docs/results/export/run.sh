#!/bin/bash
# How docs/results/export/ was made (run from the repository root, venv active):
# the main job per seed, its export, 5 recovery rounds from the 80% pruned file, export.
set -e
OUT=${OUT:-outputs/export-bench}
for s in 42 1 2; do
  D=$OUT/dense-$s; R=$OUT/recover-$s
  fedslim simulate --num-clients 10 --rounds 20 --partitioning dirichlet \
    --dirichlet-alpha 0.5 --output-dir $D -c seed=$s
  fedslim export $D > docs/results/export/dense-seed$s.txt
  fedslim simulate --num-clients 10 --rounds 5 --partitioning dirichlet \
    --dirichlet-alpha 0.5 --output-dir $R -c seed=$s \
    -c init-from=$D/export/unstructured-80.safetensors -c sparse-training=true
  fedslim export $R --sparsity 0.8 > docs/results/export/recover-seed$s.txt
done
