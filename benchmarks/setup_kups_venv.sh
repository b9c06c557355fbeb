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
if [[ -z "$PY" ]]; then
  for cand in $(ls -d /root/.pyenv/versions/3.12.* "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.* 2>/dev/null | sort -V -r); do
    if [[ -x "$cand/bin/python" ]]; then PY="$cand/bin/python"; break; fi
  done
fi
if [[ -z "$PY" ]]; then
  PY="$(command -v python3.12 || true)"
fi
if [[ -z "$PY" ]]; then
  echo "no Python 3.12 found: install one (pyenv install 3.12) or set KUPS_PYTHON" >&2
  exit 1
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet kups
"$VENV/bin/python" -c "import kups, jax; print('kups', getattr(kups, '__version__', '?'), 'jax', jax.__version__)" >&2
echo "$VENV/bin/python"
