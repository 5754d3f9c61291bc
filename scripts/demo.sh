#!/usr/bin/env bash
# The main job on the embedded default (SmolLM2-135M-Instruct, synthetic users), on a CPU.
# It grows into the whole pipeline (build_data → SFT → PRMU → GSPO → evaluate) as the
# stages land; today it runs the parts that exist.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. "${TAGPR_VENV:-.venv}/bin/activate"
RUN=${RUN:-runs/demo}
mkdir -p "$RUN"
echo "== synthetic users (LaMP format) and what a profile is worth"
python -m tagpr.synthetic --out "$RUN/lamp" --report | tee "$RUN/synthetic.md"
echo "== the base model on held-out users: zero-shot vs RAG"
python scripts/base_model_check.py --lamp-dir "$RUN/lamp" | tee "$RUN/base_model.jsonl"
