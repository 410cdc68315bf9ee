#!/usr/bin/env bash
# Fresh machine → virtual environment → dvdquant installed → `dvdquant demo` on the embedded model.
# On CPU machines the CPU build of torch is installed first (a plain `torch` would pull CUDA wheels);
# on a GPU machine set TORCH_SPEC to the torch you want (e.g. TORCH_SPEC=torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e .
dvdquant demo --out "${1:-dvdquant_demo}"
