#!/usr/bin/env bash
# One device-tool call: check the suite compiled on the GPU, run compute-sanitizer on the kernels, tune and time.
# Usage: bash bench/gpu_session.sh STEP...   (steps: env tests sanitize tune-prefill bench-quick bench-sweep step)
# Logs and results land in $OUT (the device tool brings them back). PHASEATTN_COMMIT=<sha> names the commit in
# the bench results when the copied tree has no .git.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
for step in "$@"; do
  echo "=== $step $(date -u +%H:%M:%S)"
  case $step in
    env)
      nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv
      python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.version.cuda)" ;;
    tests)
      PHASEATTN_AUTOTUNE=0 timeout 420 python3 -m pytest tests -q -x -p no:cacheprovider -n 4 \
        2>&1 | tee "$OUT/pytest_gpu.log" | tail -25 ;;
    sanitize)
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 PHASEATTN_AUTOTUNE=0 timeout 300 compute-sanitizer --tool memcheck \
        --error-exitcode 9 python3 bench/sanitize_cases.py 2>&1 | tee "$OUT/sanitizer.log" | tail -8 ;;
    tune-prefill)
      timeout 420 python3 bench/tune_prefill.py --out "$OUT" 2>&1 | tee "$OUT/tune_prefill.log" | tail -30 ;;
    bench-quick)
      timeout 230 python3 -m bench all --quick --budget-s 170 ${PHASEATTN_COMMIT:+--commit $PHASEATTN_COMMIT} \
        --out "$OUT/bench-quick.json" 2>&1 | tee "$OUT/bench_quick.log" | tail -40 ;;
    bench-sweep)
      timeout 480 python3 -m bench all --no-autotune --sweep-peers sdpa-flash,sdpa-cudnn --rep-ms 50 --budget-s 380 \
        ${PHASEATTN_COMMIT:+--commit $PHASEATTN_COMMIT} --out "$OUT/bench-sweep.json" \
        2>&1 | tee "$OUT/bench_sweep.log" | tail -40 ;;
    step)  # engine decode step, CUDA graphs on/off: tiny and random Llama-8B shape, batch 1 and 64 (bench/step.py)
      timeout 240 python3 -m bench step --no-autotune ${PHASEATTN_COMMIT:+--commit $PHASEATTN_COMMIT} \
        --out "$OUT/bench-step.json" 2>&1 | tee "$OUT/bench_step.log" | tail -30 ;;
    *) echo "unknown step $step" ;;
  esac
done
