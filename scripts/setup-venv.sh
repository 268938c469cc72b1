#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install valve-id into it, editable, with extras.
#   usage: scripts/setup-venv.sh [EXTRAS]      (default extras: dev)
# VALVE_ID_VENV chooses the folder (default .venv); PYTHON the interpreter (default python3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VALVE_ID_VENV:-.venv}"
python="${PYTHON:-python3.11}"
extras="${1:-dev}"
command -v "$python" >/dev/null || python=python3
if [ ! -x "$venv/bin/python" ]; then
  echo "setup-venv: creating $venv with $("$python" --version)"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
# A reinstall is cheap when nothing changed (pip only checks what is already there).
"$venv/bin/python" -m pip install --quiet -e ".[${extras}]"
echo "setup-venv: ready: $venv ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
