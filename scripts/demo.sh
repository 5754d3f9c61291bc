#!/usr/bin/env bash
# The main job on the embedded default (SmolLM2-135M-Instruct, synthetic users), on a CPU:
# build_data → train_sft → train_prmu → torchrun (2 ranks) train_rl → evaluate → runs/demo/report.md.
# Rerun after an interruption to resume. Extra arguments go to scripts/demo.py (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# jemalloc makes the stages ~20 % faster on a CPU (scripts/demo.py, malloc_env); as root on Debian/Ubuntu, install it
if ! ldconfig -p 2>/dev/null | grep -q 'libjemalloc\.so'; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing libjemalloc2 (apt-get) for the demo's stages"
        { apt-get install -y -q libjemalloc2 || { apt-get update -q && apt-get install -y -q libjemalloc2; }; } \
            >/dev/null 2>&1 || echo "could not install libjemalloc2: the stages use glibc malloc (~20 % slower)"
    else
        echo "no libjemalloc on this machine: the stages use glibc malloc (~20 % slower; apt install libjemalloc2)"
    fi
fi
. "${TAGPR_VENV:-.venv}/bin/activate"
python scripts/demo.py "$@"
