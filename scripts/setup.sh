#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv with everything pinned in
# requirements*.txt / requirements.lock, and installs rankline itself (editable).
# Re-running is a no-op (a few milliseconds) when nothing it depends on has changed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${RANKLINE_VENV:-.venv}"
STAMP="$VENV/.rankline-setup"
want="$(cat requirements.txt requirements-dev.txt requirements.lock setup.py | sha256sum | cut -d' ' -f1)"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  for cand in python3.11 python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && \
       "$cand" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' 2>/dev/null; then
      PY="$cand"; break
    fi
  done
fi
if [[ -z "$PY" ]]; then
  echo "setup: Python 3.11 is required (TensorFlow 2.21 + tensorflow-transform 1.21); set PYTHON=/path/to/python3.11" >&2
  exit 2
fi

echo "setup: creating $VENV with $("$PY" --version) (first run downloads ~3 GB of wheels; a few minutes)" >&2
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --progress-bar off -r requirements.txt -r requirements-dev.txt -c requirements.lock
"$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e .
echo "$want" > "$STAMP"
echo "setup: done" >&2
