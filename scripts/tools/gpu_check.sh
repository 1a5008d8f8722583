#!/usr/bin/env bash
# One CUDA GPU (or CPU, for a dry run): a sensitivity scan and a distillation step in virtual TP, a tp=1
# DeepSpeed engine (eval + generate, with the distilled checkpoint), a bf16 eval, and the decode step captured as
# CUDA graphs against the eager one (tp 1; on CPU it compiles without capture); prints timings.
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
# the captured step: torch.compile(mode="reduce-overhead") of the engine's one-token forward over HF's static cache
# (scripts/experiments/compiled_decode.py), same greedy tokens as eager; cudagraph_skips 0: the whole step captured
t0=$EPOCHREALTIME
$PY -m torch.distributed.run --nproc_per_node 1 scripts/experiments/compiled_decode.py --model "$MODEL" \
  --spd-blocks 15-29 --mode reduce-overhead --rounds 3 --steps 32 --out "$OUT/captured_decode.json" \
  > "$OUT/captured_decode.err" 2>&1 || { tail -20 "$OUT/captured_decode.err"; exit 1; }
printf '%-20s %6.1f s (process, compile included)  %s\n' captured_decode "$(awk "BEGIN {print $EPOCHREALTIME - $t0}")" \
  "$($PY -c "import json; d = json.load(open('$OUT/captured_decode.json')); print({k: d[k] for k in ('device', \
'cudagraph_skips', 'compile_seconds', 'same_greedy_tokens', 'compiled_over_eager_median')})")"
