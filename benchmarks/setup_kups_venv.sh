#!/usr/bin/env bash
# Make a Python >= 3.12 virtual environment with kups (https://pypi.org/project/kups/) for
# benchmarks/bench_lj_alternatives.py. kups needs Python >= 3.12; the main environment is 3.11.
#
#     bash benchmarks/setup_kups_venv.sh [VENV_DIR]      # default /tmp/kups-venv
#
# Uses the newest pyenv-installed 3.12 (or $KUPS_PYTHON if set). Prints the venv's python path.
set -euo pipefail
VENV="${1:-/tmp/kups-venv}"
PY="${KUPS_PYTHON:-}"
source "$(dirname "${BASH_SOURCE[0]}")/python312.sh"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet kups
"$VENV/bin/python" -c "import kups, jax; print('kups', getattr(kups, '__version__', '?'), 'jax', jax.__version__)" >&2
echo "$VENV/bin/python"
