#!/usr/bin/env bash
# One device call: GPU kernel tests, act-kernel tuning sweep, then the per-layer benchmark with
# the best launch config. Everything lands in $OUT.   bash benchmarks/run_gpu.sh
set -o pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"
timeout ${PYTEST_TIMEOUT:-150} python3 -m pytest -q -m gpu tests/test_kernels_gpu.py -p no:cacheprovider --maxfail=8 -rs \
  2>&1 | tee "$OUT/pytest_gpu.txt" | grep -E "^(FAILED|ERROR|E  )|passed|failed|^____" | head -40
timeout ${TUNE_TIMEOUT:-120} python3 benchmarks/tune_act_quant.py --out "$OUT" 2>&1 | tee "$OUT/tune_log.txt" | tail -6
CFG=$(python3 -c "import json; print(json.dumps(json.load(open('$OUT/act_tune.json'))['results'][0]['config']))" 2>/dev/null)
echo "act config: ${CFG:-default}"
timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/bench_linear.py --out "$OUT" --rep ${REP:-40} ${CFG:+--act-config "$CFG"} $BENCH_ARGS \
  2>&1 | tee "$OUT/bench_log.txt" | grep -v '^|' | cut -c1-200
