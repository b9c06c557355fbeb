#!/usr/bin/env bash
# Make a Python >= 3.12 virtual environment with torch-sim 0.6.2
# (https://pypi.org/project/torch-sim-atomistic/, with its "vesin" extra so that vesin's neighbor
# list can be chosen), sevenn and ase, for the torch-sim rows of benchmarks/bench_lj_alternatives.py
# and benchmarks/bench_sevennet.py (both run benchmarks/torchsim_runner.py in it). torch-sim >= 0.4
# needs Python >= 3.12; the main environment is 3.11.
#
#     bash benchmarks/setup_torchsim_venv.sh [VENV_DIR]      # default /tmp/torchsim-venv
#
# Uses the newest pyenv-installed 3.12 (or $TORCHSIM_PYTHON if set). Idempotent: a second run
# reuses the venv and installs nothing new. Prints the venv's python path (last line, stdout)
# and the installed versions (stderr).
#
# torch comes from PyPI: for Python 3.12 that is a CUDA build of several GB (it runs on the CPU
# as well). Where /etc/xdg/pip caps torch (<= 2.14.1 on the development machines), pip takes
# the newest torch under the cap; torch-sim 0.6.2 asks only for torch >= 2, so the cap is left alone.
set -euo pipefail
VENV="${1:-/tmp/torchsim-venv}"
TORCH_SIM_VERSION="${TORCH_SIM_VERSION:-0.6.2}"
PY="${TORCHSIM_PYTHON:-}"
source "$(dirname "${BASH_SOURCE[0]}")/python312.sh"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" - "$TORCH_SIM_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
assert version("torch-sim-atomistic") == sys.argv[1]
import ase, sevenn, torch, torch_sim, vesin  # noqa: F401
EOF
then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "torch-sim-atomistic[vesin]==$TORCH_SIM_VERSION" sevenn ase
fi
"$VENV/bin/python" - >&2 <<'EOF'
from importlib.metadata import version
print(", ".join(f"{p} {version(p)}" for p in ("torch-sim-atomistic", "torch", "sevenn", "ase", "numpy", "vesin",
                                               "nvalchemi-toolkit-ops", "warp-lang")))
EOF
echo "$VENV/bin/python"
