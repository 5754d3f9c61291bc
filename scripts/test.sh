#!/usr/bin/env bash
# The test suite (installs first if needed). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. "${TAGPR_VENV:-.venv}/bin/activate"
python -m pytest -q "$@"
