#!/usr/bin/env bash
# Set everything up on a fresh machine and run the main job: pretrain the `small`
# preset on the embedded pretrain_data/ (about 10 minutes on a 2-core CPU), then
# print a sample from the trained model.
#   scripts/quickstart.sh            Linux CPU or macOS (Metal)
#   scripts/quickstart.sh --cuda     Linux with an NVIDIA GPU
if [ "${1:-}" = "--cuda" ]; then export MIXTRAL_MLX_BACKEND=cuda; shift; fi
source "$(dirname "$0")/setup.sh"
$PY -m mixtral_mlx info --preset small
