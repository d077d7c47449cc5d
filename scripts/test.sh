#!/usr/bin/env bash
# Install mixtral-mlx with its dev extra (pytest, torch, transformers) and run the tests.
# Arguments go to pytest, e.g. scripts/test.sh -k reference -x
MIXTRAL_MLX_EXTRAS=dev
source "$(dirname "$0")/setup.sh"
echo "==> running the tests"
$PY -m mixtral_mlx info
exec $PY -m pytest -q tests "$@"
