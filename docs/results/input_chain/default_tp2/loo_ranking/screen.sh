# The screen (run from the repository root; resumable, steps.sh's `step`): the README path's 30-block checkpoint run
# with two 21-block sets in SPD form, the other nine blocks in TP form with their original weights (docs/experiments.md,
# "Blocks ranked by their cost in context"): the README path's plan (the zero-shot cumulative scan's 21 cheapest) and
# the in-context set (the nine blocks that add most to the all-block model, leave_one_out/summary.md, back in TP form).
set -euo pipefail
cd "$(dirname "$0")/../../../../.."
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false
out=docs/results/input_chain/default_tp2/loo_ranking; d=docs/results/input_chain/default_tp2
ck=runs/readme30/checkpoint30
mkdir -p "$out/logs"
STEP_PREFIX=""; source scripts/benchmarks/steps.sh
default_set=$(spd_blocks_of docs/results/readme_path/default_tp2/cumulative_scan/plan21.json)
context_set=$(in_context_set $d/leave_one_out/summary.json 9)
echo "default: $default_set"; echo "context: $context_set"
for text in second_half guard; do
  for name in default context; do
    set_var=${name}_set
    eval_step "screen_${text}_$name" $d/$text.txt --checkpoint $ck --spd-blocks "${!set_var}"
  done
done
# beside it: block 23 (the costliest at 21) and block 4 alone in zero-shot SPD form on the confirmation text, against
# leave_one_out21's TP run and block23/eval_ep8_seg64.json (block 23 alone, distilled)
for b in 23 4; do
  eval_step "zs_block$b" $d/confirmation.txt --spd-blocks $b
done
