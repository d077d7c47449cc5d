# Sourced by quickstart.sh and test.sh: make (or reuse) a virtual environment and install
# mixtral-mlx into it with the MLX build that fits this machine.
#
#   MIXTRAL_MLX_BACKEND=cuda   install MLX's CUDA build on Linux (default: cpu)
#   MIXTRAL_MLX_EXTRAS=dev     extra groups to install as well (comma separated)
#   MIXTRAL_MLX_TORCH=...      the torch requirement for the dev extra on Linux
#                              (default torch==2.13.0; use your own to pick another build)

set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ -z "${VIRTUAL_ENV:-}" ]; then
    if [ ! -x .venv/bin/python ]; then
        echo "==> creating .venv"
        python3 -m venv .venv
    fi
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi
PY=python

extras="${MIXTRAL_MLX_EXTRAS:-}"
case "$(uname -s)" in
    Darwin) ;;  # plain `mlx` (Metal) comes with the base requirements on macOS
    Linux) extras="${MIXTRAL_MLX_BACKEND:-cpu}${extras:+,$extras}" ;;
    *) echo "unsupported system $(uname -s)" >&2; exit 1 ;;
esac

echo "==> installing mixtral-mlx[${extras}] into $(dirname "$(dirname "$(command -v $PY)")")"
$PY -m pip install -q --upgrade pip
if [ "$(uname -s)" = Linux ] && [[ ",$extras," == *",dev,"* ]]; then
    # Pin torch first: an open range would pull the newest CUDA build (several GB).
    $PY -m pip install -q "${MIXTRAL_MLX_TORCH:-torch==2.13.0}"
fi
$PY -m pip install -q -e ".[${extras}]"
