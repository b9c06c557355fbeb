# Sourced by the venv setup scripts: sets PY to a Python 3.12 interpreter (torch-sim >= 0.4 and
# kups need Python >= 3.12; the main environment is 3.11).
#
#     PY="${SOME_OVERRIDE:-}"; source benchmarks/python312.sh
#
# Keeps a PY that is already set; else the newest pyenv-installed 3.12, else python3.12 on PATH;
# else exits 1 with a message.
if [[ -z "${PY:-}" ]]; then
  for cand in $(ls -d /root/.pyenv/versions/3.12.* "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.* 2>/dev/null | sort -V -r); do
    if [[ -x "$cand/bin/python" ]]; then PY="$cand/bin/python"; break; fi
  done
fi
if [[ -z "${PY:-}" ]]; then
  PY="$(command -v python3.12 || true)"
fi
if [[ -z "$PY" ]]; then
  echo "no Python 3.12 found: install one (pyenv install 3.12) or set the script's *_PYTHON variable" >&2
  exit 1
fi
