#!/usr/bin/env bash
# One device call: the GPU kernel tests, the per-layer benchmark, the int4 GEMV (weight-only layers)
# benchmark and the fp8-vs-emulated numerics check on the embedded model.
# Everything lands in $OUT.   bash benchmarks/run_gpu.sh
set -o pipefail
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/pytest_gpu.txt"
timeout ${PYTEST_TIMEOUT:-200} python3 -m pytest -q -s -m gpu tests/test_kernels_gpu.py tests/test_int4_gemv.py -p no:cacheprovider --maxfail=8 -rs \
  2>&1 | tee -a "$OUT/pytest_gpu.txt" | grep -E "^(FAILED|ERROR|E  )|passed|failed|^____" | head -40
timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/bench_linear.py --out "$OUT" --rep ${REP:-30} $BENCH_ARGS \
  2>&1 | grep -v '^|' | cut -c1-220
timeout ${GEMV_TIMEOUT:-120} python3 benchmarks/bench_int4_gemv.py --out "$OUT" --rep 20 --quick 2>&1 | tail -6
timeout ${NUM_TIMEOUT:-120} python3 benchmarks/check_fp8_numerics.py --out "$OUT" 2>&1 | tee "$OUT/numerics_log.txt" | tail -8
