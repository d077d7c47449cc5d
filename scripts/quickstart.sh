#!/usr/bin/env bash
# Set everything up on a fresh machine and run the main job: pretrain the `small`
# preset on the embedded pretrain_data/ (about 10 minutes on a 2-core CPU), then
# print a sample from the trained model.
#   scripts/quickstart.sh            Linux CPU or macOS (Metal)
#   scripts/quickstart.sh --cuda     Linux with an NVIDIA GPU
if [ "${1:-}" = "--cuda" ]; then export MIXTRAL_MLX_BACKEND=cuda; shift; fi
source "$(dirname "$0")/setup.sh"
$PY -m mixtral_mlx info

echo "==> pretraining the small preset on pretrain_data/ (about 10 minutes on a 2-core CPU)"
# --seq-len 328: every story of pretrain_data (326 tokens at most) fits one window whole.
$PY -m mixtral_mlx pretrain --seq-len 328 --out runs/quickstart --overwrite --max-time "${QUICKSTART_MINUTES:-10}"

echo "==> a sample from the trained model"
$PY -m mixtral_mlx generate --model runs/quickstart/final --prompt "Once upon a time" --mode greedy --max-tokens 80
echo
echo "==> plots: runs/quickstart/plots/*.png; metrics: runs/quickstart/metrics.jsonl"
