#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md in one run, for a machine with one CUDA GPU (LLaVA-1.5-7B's real
# shape, random weights, bf16). Writes one JSON file per benchmark into $OUT (default ./benchmark-results):
#   bash benchmarks/gpu.sh                # about 5 minutes on one H100/H200
set -euo pipefail
OUT=${OUT:-benchmark-results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
python benchmarks/prefill.py --full --device cuda --dtype bfloat16 --json | tee "$OUT/prefill.json"
python benchmarks/generate.py --full --device cuda --dtype bfloat16 --json | tee "$OUT/generate.json"
python benchmarks/train_step.py --full --device cuda --dtype bfloat16 --json | tee "$OUT/train_step.json"
