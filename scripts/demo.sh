#!/usr/bin/env bash
# The main job on the embedded default (SmolLM2-135M-Instruct, synthetic users), on a CPU:
# build_data → train_sft → train_prmu → torchrun (2 ranks) train_rl → evaluate → runs/demo/report.md.
# Rerun after an interruption to resume. Extra arguments go to scripts/demo.py (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. "${TAGPR_VENV:-.venv}/bin/activate"
python scripts/demo.py "$@"
