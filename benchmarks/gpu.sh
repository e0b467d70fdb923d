#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md in one run, for a machine with one CUDA GPU (LLaVA-1.5-7B's real
# shape, and for the prefill also LLaVA-NeXT-7B's at 672 x 672, 2,928 vision tokens; random weights, bf16). Writes one
# JSON file per benchmark into $OUT (default ./benchmark-results):
#   bash benchmarks/gpu.sh                # about 5 to 6 minutes on one H100/H200
set -euo pipefail
OUT=${OUT:-benchmark-results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
python benchmarks/prefill.py --full --device cuda --dtype bfloat16 --json | tee "$OUT/prefill.json"
python benchmarks/prefill.py --model llava-next-7b --full --device cuda --dtype bfloat16 --json |
    tee "$OUT/prefill_next.json"
python benchmarks/generate.py --full --device cuda --dtype bfloat16 --json | tee "$OUT/generate.json"
python benchmarks/train_step.py --full --device cuda --dtype bfloat16 --json | tee "$OUT/train_step.json"
