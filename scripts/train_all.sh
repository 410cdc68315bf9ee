#!/usr/bin/env bash
# Reproduce the shipped assets on one GPU (~8 min on an H100): the evaluator classifier
# (in the background), the embedded DiT in two stages exactly as shipped, then the FP
# model's prompt adherence. Everything lands in $1 (default out/train_all).
#   bash scripts/train_all.sh [OUTDIR]
#   cp OUTDIR/embedded/* src/dvdquant/assets/embedded/; cp OUTDIR/classifier/* src/dvdquant/assets/classifier/
# Stage 1 ran eager (its step count came from --time-budget-s 280 next to the classifier);
# stage 2 continues with regional torch.compile (~41 ms/step at batch 128 vs ~140 eager at 256).
set -euo pipefail
OUTDIR=${1:-out/train_all}
mkdir -p "$OUTDIR"
python3 scripts/train_classifier.py --out "$OUTDIR/classifier" > "$OUTDIR/classifier.log" 2>&1 &
CLF=$!
python3 scripts/train_embedded.py --out "$OUTDIR/stage1" --seed 0 --steps 1349 --batch 256 --lr 5e-4 \
  --warmup 200 2>&1 | tee "$OUTDIR/stage1.log"
python3 scripts/train_embedded.py --out "$OUTDIR/embedded" --init-from "$OUTDIR/stage1" --seed 1 \
  --steps 4393 --batch 128 --lr 8e-4 --warmup 100 --compile 1 2>&1 | tee "$OUTDIR/stage2.log"
wait $CLF || { cat "$OUTDIR/classifier.log"; exit 1; }
tail -3 "$OUTDIR/classifier.log"
python3 scripts/eval_adherence.py --model-dir "$OUTDIR/embedded" --classifier-dir "$OUTDIR/classifier" \
  --clips 128 --steps 20 --guidance 4.0 --json "$OUTDIR/adherence.json" --grid "$OUTDIR/grid.png"
