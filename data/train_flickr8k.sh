#!/usr/bin/env bash
# The recipe of the shipped model (checkpoints/README.md): `make train-flickr8k`.
#
# Two decoders with different seeds train side by side on the cached EfficientNet-Lite0 features
# (one CPU thread each: a small LSTM gains little from a second thread, and two runs use both
# cores), then `captioner combine` joins them into one fp16 ensemble checkpoint.
# Every step is resumable: run it again after a crash and finished parts are skipped.
set -euo pipefail
FLICKR8K=${FLICKR8K:-../shared/data/flickr8k}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/flickr8k}
CACHE=${CACHE:-$OUT/cache}
TARGET=${TARGET:-checkpoints/model.safetensors}
COMMON=(--dataset flickr8k --data-root "$FLICKR8K" --epochs 12 --batch-size 128 --lr 5e-4
        --patience 4 --cache-dir "$CACHE")

mkdir -p "$OUT"
start=$(date +%s)
# The feature cache first (both runs read it), then the two decoders in parallel.
$PY -m captioner prepare --dataset flickr8k --data-root "$FLICKR8K" --cache-dir "$CACHE"
for seed in 0 1; do
  OMP_NUM_THREADS=1 $PY -m captioner train "${COMMON[@]}" --seed $seed --output "$OUT/seed$seed" --resume \
    > "$OUT/seed$seed.log" 2>&1 &
done
wait
$PY -m captioner combine "$OUT/seed0/best" "$OUT/seed1/best" --half -o "$TARGET"
echo "recipe wall time: $(( $(date +%s) - start )) s"
$PY -m captioner evaluate --checkpoint "$TARGET" --dataset flickr8k --data-root "$FLICKR8K" --split test \
  --method beam --beam-size 3 --json "$OUT/test_beam3.json"
