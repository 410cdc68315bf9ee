#!/usr/bin/env bash
# Fresh machine with only Python → .venv with torch, dvdquant and its test extras → `dvdquant demo`.
# Afterwards the README's test command, `.venv/bin/python -m pytest -q`, runs the tests.
# torch: the CUDA build from the default index where `nvidia-smi` sees a GPU; otherwise the CPU build
# from the PyTorch CPU index (TORCH_CPU_INDEX), falling back to the default index if that is unreachable.
# Override the torch requirement with TORCH_SPEC, the interpreter with PYTHON, the demo folder with $1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${TORCH_SPEC:-torch==2.13.0}
CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
OUT=${1:-dvdquant_demo}
VPY=.venv/bin/python

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "quickstart: GPU found: .venv ← $TORCH (CUDA build, default index) + dvdquant[test], then dvdquant demo --out $OUT"
    GPU=1
else
    echo "quickstart: no GPU: .venv ← $TORCH (CPU build: $CPU_INDEX, else the default index) + dvdquant[test], then dvdquant demo --out $OUT"
    GPU=0
fi
[ -x "$VPY" ] || "$PY" -m venv .venv
"$VPY" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
if [ "$GPU" = 1 ]; then
    "$VPY" -m pip install -q --disable-pip-version-check "$TORCH"
elif ! "$VPY" -m pip install -q --disable-pip-version-check --timeout 10 --retries 0 --index-url "$CPU_INDEX" \
        "$TORCH" >/dev/null 2>&1; then
    echo "quickstart: $CPU_INDEX unreachable: torch from the default index"
    "$VPY" -m pip install -q --disable-pip-version-check "$TORCH"
fi
"$VPY" -m pip install -q --disable-pip-version-check -e ".[test]"
.venv/bin/dvdquant demo --out "$OUT"
