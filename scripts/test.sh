#!/usr/bin/env bash
# The test suite (installs first if needed). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. "${TAGPR_VENV:-.venv}/bin/activate"
# TRL, for the parity test of our GSPO objective against TRL's own (tests/test_vs_trl.py; skipped without it)
python -c "import trl" 2>/dev/null || pip install -q --disable-pip-version-check -e ".[bench]" 2> >(grep -v "is ignored: it is neither" >&2)
python -m pytest -q "$@"
