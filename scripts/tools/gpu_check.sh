#!/usr/bin/env bash
# One CUDA GPU (or CPU, for a dry run): a sensitivity scan and a distillation step in virtual TP, a tp=1
# DeepSpeed engine (eval + generate, with the distilled checkpoint), and a bf16 eval; prints timings.
#   MODEL=default OUT=runs/gpu_check bash scripts/tools/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-default}; OUT=${OUT:-runs/gpu_check}; PY=${PY:-python3}
mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false
step() {  # name, command...: run it, keep its JSON line, print the wall time
  local name=$1; shift
  local t0=$EPOCHREALTIME
  "$@" --json 2> "$OUT/$name.err" | grep '^{' | tail -1 > "$OUT/$name.json" || { tail -20 "$OUT/$name.err"; exit 1; }
  printf '%-20s %6.1f s (process, model load included)  %s\n' "$name" \
    "$(awk "BEGIN {print $EPOCHREALTIME - $t0}")" "$(cut -c1-150 "$OUT/$name.json")"
}
$PY -c "import torch, deepspeed; from deepspeed.accelerator import get_accelerator as g; \
print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'accelerator', g().device_name(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
DT=(--model "$MODEL" --max-samples 8 --seq-len 256)   # distill's micro-batch is the DeepSpeed config's
D=("${DT[@]}" --batch-size 4)
step scan_virtual_tp2   $PY -m ds_spd scan "${D[@]}" --tp 2 --virtual-tp 2 --out "$OUT/plan.json"
step plan_half          $PY -m ds_spd plan --plan "$OUT/plan.json" --spd-fraction 0.5 --thresholds 0,0
step distill_1_epoch    $PY -m ds_spd distill "${DT[@]}" --plan "$OUT/plan.json" --epochs 1 --out "$OUT/checkpoint"
step eval_tp1_engine    $PY -m ds_spd eval "${D[@]}" --tp 1 --spd-blocks 15-29
step generate_tp1       $PY -m ds_spd generate --model "$MODEL" --tp 1 --spd-blocks 15-29 --max-new-tokens 32
step eval_virtual_ckpt  $PY -m ds_spd eval "${D[@]}" --virtual-tp 2 --checkpoint "$OUT/checkpoint"
step eval_virtual_bf16  $PY -m ds_spd eval "${D[@]}" --virtual-tp 2 --checkpoint "$OUT/checkpoint" --dtype bfloat16
