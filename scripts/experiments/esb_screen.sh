#!/usr/bin/env bash
# One extremely sensitive block trained alone (a plan with every other block in TP form), then its cost on a text:
# the screen for a setting meant for those blocks (docs/experiments.md, "Settings for the extremely sensitive
# blocks"). Each argument is a variant, NAME=FLAGS (distill flags; the block's default settings where none are given);
# PLAN, TEXT and OUT in the environment change the plan (default: block 1 of SmolLM2's 30-block plan), the text
# (the confirmation text) and where the JSONs go:
#   bash scripts/experiments/esb_screen.sh "window1=--loss-window 1" "hg64=--hg-segments 64"
# Writes distill_NAME.json, eval_NAME.json (and logs) into OUT; resumable (scripts/benchmarks/steps.sh): a step whose
# JSON exists is not run again, a distill that stopped resumes from its work dir (runs/esb/OUT's name/NAME.work).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
(( $# )) || { echo 'usage: esb_screen.sh "NAME=FLAGS" ...' >&2; exit 2; }
dir=docs/results/input_chain/default_tp2
plan=${PLAN:-$dir/leave_one_out/block1/plan_block1.json}; text=${TEXT:-$dir/confirmation.txt}
out=${OUT:-$dir/leave_one_out/block1}
mkdir -p "$out/logs" "runs/esb/$(basename "$out")"
STEP_PREFIX=""; source scripts/benchmarks/steps.sh   # step NAME CMD: $out/NAME.json, resumable
for variant in "$@"; do
  name=${variant%%=*}; flags=${variant#*=}
  ck=runs/esb/$(basename "$out")/$name   # per OUT: two screens' variants of one name do not share a checkpoint
  # shellcheck disable=SC2086  # the flags are words
  step "distill_$name" launch/tp.sh 2 distill --model default --plan "$plan" --kl-epochs 0 --out "$ck" $flags
  OMP_NUM_THREADS=2 step "eval_$name" python -m ds_spd eval --model default --virtual-tp 2 --checkpoint "$ck" \
    --text "$text" --max-samples 32
  echo "$name: $(python scripts/tools/paired_eval.py "$out/eval_ep8_seg64.json" "$out/eval_$name.json" 2>/dev/null)"
done
