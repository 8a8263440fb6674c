#!/usr/bin/env bash
# The GPU step benchmark in one command, for a lent GPU machine (run from the repository root):
#   bash benchmarks/gpu_run.sh            # results in $OUT (the device tool's output folder), else reports/gpu
# The reference `mixlora` package runs too when its folder travels with the tree (device tool:
# carry [".venv/lib/python3.11/site-packages/mixlora"]); otherwise that method is skipped and said so.
# Extra arguments go to the script (e.g. --models smollm2-135m --shapes 8x256).
# Before spending device time, check that it runs here: the CPU smoke command in benchmarks/README.md
# ("bench_gpu_step.py"), about 3 minutes on 2 cores (session 15: rc 0, every probe ran).
set -o pipefail
OUT="${OUT:-reports/gpu}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | tee "$OUT/nvidia-smi.txt"
PYTHONUNBUFFERED=1 PYTHONPATH=. timeout -k 10 295 python3 benchmarks/bench_gpu_step.py --out "$OUT" --profile \
  --reference-code-path .venv/lib/python3.11/site-packages "$@" 2>&1 | tee "$OUT/log.txt"
