#!/usr/bin/env bash
# The GPU check: one prepared script for a lent GPU, ~8 min on one H100. Every part's output goes to $OUT (8 files
# at most: what the device tool brings back), the runs' folders to $WORK. A failing part is recorded and the next
# one runs; the exit status says whether all passed.
#
#   bash bench/gpu_check.sh          # on a machine with an NVIDIA GPU (needs rouge-score and nltk: bench/README.md)
#   bash bench/gpu_check.sh --dry    # any machine (CI): every command's arguments and paths checked, nothing run
#
# Parts: the environment; the Triton log-prob kernels compiled for real against an fp64 reference
# (bench/kernel_check.py); their speed against bare matmuls and the chunked path at the Qwen3-8B shape
# (bench/logprob.py); flash-attn if it imports; 10 SFT steps and 2 GSPO steps of a SmolLM2-135M-shaped model in
# bf16 on CUDA under FSDP2 (one process; random weights: SmolLM2's do not fit the 64 MiB a lent machine takes
# along, and speed does not depend on them); the rollout bench against transformers' generate.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry" ]; then DRY=1; elif [ -n "${1:-}" ]; then echo "usage: bash bench/gpu_check.sh [--dry]" >&2; exit 2; fi
OUT=${OUT:-runs/gpu_check}
WORK=${WORK:-/tmp/tagpr_gpu_check}
PY=${PYTHON:-python3}
DEV=cuda
if [ "$DRY" = 1 ]; then export TAGPR_CHECK_ARGS=1; DEV=cpu; fi
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
: > "$OUT/summary.txt"
failed=0

part() {  # part NAME COMMAND...: run it, its output in $LOGS/NAME.log, its verdict and time in summary.txt
  local name=$1; shift
  local log="${LOGS:-$OUT}/$name.log"
  echo "== $name: ${SHOW:-$*}" | tee -a "$OUT/summary.txt"
  local t0=$SECONDS
  if "$@" > "$log" 2>&1; then
    echo "   $name: ok in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  else
    echo "   $name: FAILED (exit $?) in $((SECONDS - t0)) s; tail of $log:" | tee -a "$OUT/summary.txt"
    tail -5 "$log" | sed 's/^/     /' | tee -a "$OUT/summary.txt"
    failed=1
  fi
}

for f in bench/kernel_check.py bench/logprob.py bench/random_model.py bench/rollout.py build_data.py train_sft.py \
         train_rl.py; do
  [ -f "$f" ] || { echo "missing: $f" | tee -a "$OUT/summary.txt"; failed=1; }
done

{
  echo "date: $(date -u +%FT%TZ)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')  dry: $DRY"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__, 'gpu', torch.cuda.is_available())"
  "$PY" -c "import flash_attn; print('flash-attn', flash_attn.__version__)" 2>/dev/null || echo "flash-attn: not installed"
} >> "$OUT/summary.txt" 2>&1

part kernel "$PY" bench/kernel_check.py --device "$DEV"
part logprob "$PY" bench/logprob.py --device "$DEV"
# the setup parts log to $WORK: $OUT keeps 8 files (summary + 7 logs)
LOGS=$WORK part model "$PY" bench/random_model.py --out "$WORK/model"
LOGS=$WORK part data "$PY" build_data.py --preset synthetic --tasks LaMP_2 --difficulty easy --k 2 --chain-style terse \
  --out "$WORK/data" --eval-prompts 0
if [ "$DRY" = 1 ] || "$PY" -c "import flash_attn" 2>/dev/null; then
  SHOW="a SmolLM2-shaped forward with flash-attention-2 in bf16" part flash_attn "$PY" -c "
import os, sys
if os.environ.get('TAGPR_CHECK_ARGS') == '1':
    sys.exit(print('arguments ok: the flash-attn forward'))
import torch, flash_attn
from tagpr.models import attention_implementation, load_model
print('attention:', attention_implementation('cuda'))
m, tok = load_model('$WORK/model', device='cuda', dtype=torch.bfloat16)
x = torch.randint(0, 2000, (4, 256), device='cuda')
print('flash-attention-2 forward ok:', tuple(m(x).logits.shape), m.config._attn_implementation)"
fi
part sft "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train_sft.py --model "$WORK/model" \
  --sft "$WORK/data/sft.jsonl" --out "$WORK/sft" --max-steps 10 --global-batch 8 --micro-batch 4 --lr 1e-5 \
  --precision bf16 --max-len 1024 --eval-frac 0 --save-every 10 --keep 1 --resume ""
part rl "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train_rl.py --policy "$WORK/sft/model" \
  --prompts "$WORK/data/rl_prompts.jsonl" --prmu none --out "$WORK/rl" --max-steps 2 --global-batch 8 --group 4 \
  --mini-batches 2 --micro-batch 8 --max-new-tokens 160 --lr 1e-5 --precision bf16 --save-every 2 --keep 1 \
  --resume ""
part rollout "$PY" bench/rollout.py --model "$WORK/model" --device "$DEV" --precision bf16 --batch 64 --group 4 \
  --new 128 --repeats 3
echo "gpu_check: $([ $failed = 0 ] && echo 'all parts passed' || echo 'some parts FAILED') → $OUT" | tee -a "$OUT/summary.txt"
exit $failed
