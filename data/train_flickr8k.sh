#!/usr/bin/env bash
# The recipe of the shipped model (checkpoints/README.md): `make train-flickr8k`.
#
# 1. the feature cache: EfficientNet-Lite0 features of the train and dev photos, computed once;
# 2. 12 epochs of the LSTM decoder on those features (best dev CIDEr kept, early stopping);
# 3. the best checkpoint stored as fp16 with the decoding defaults chosen on dev (beam 3,
#    length penalty 0.5), then scored on the test split and the scores recorded in its header.
# Rerun after a crash: training resumes from its last checkpoint.
set -euo pipefail
FLICKR8K=${FLICKR8K:-../shared/data/flickr8k}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/flickr8k}
CACHE=${CACHE:-$OUT/cache}
TARGET=${TARGET:-checkpoints/model.safetensors}

mkdir -p "$OUT"
start=$(date +%s)
$PY -m captioner prepare --dataset flickr8k --data-root "$FLICKR8K" --cache-dir "$CACHE"
# One thread: the small LSTM's matrix products gain little from a second one, and on a busy
# machine a second thread made each step several times slower.
OMP_NUM_THREADS=1 $PY -m captioner train --dataset flickr8k --data-root "$FLICKR8K" --output "$OUT" \
  --cache-dir "$CACHE" --epochs 12 --batch-size 128 --lr 5e-4 --patience 4 --seed 0 --resume
cp "$OUT/best/model.safetensors" "$TARGET"
$PY scripts/stamp_model_info.py "$TARGET" --half --decode method='"beam"' --decode beam_size=3 \
  --decode length_penalty=0.5 --recipe "make train-flickr8k"
echo "recipe wall time (cache + training): $(( $(date +%s) - start )) s"
for split in dev test; do
  $PY -m captioner evaluate --checkpoint "$TARGET" --dataset flickr8k --data-root "$FLICKR8K" \
    --split $split --method beam --beam-size 3 --json "$OUT/${split}_beam3.json"
done
$PY scripts/stamp_model_info.py "$TARGET" --half --scores dev="$OUT/dev_beam3.json" \
  --scores test="$OUT/test_beam3.json"
