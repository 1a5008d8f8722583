# The commands that produced this directory's files (run from the repository root; resumable, steps.sh's `step`):
# SmolLM2's 21-block sets on the fresh description text, 128 windows (docs/experiments.md, "Block sets decided on
# the fresh description text"): the decision (the KL scan's set against the default's, both distilled with today's
# defaults) and, deciding nothing, TP and the README path's 30-block model with two 21-block sets in SPD form.
set -euo pipefail
cd "$(dirname "$0")/../../../../.."
export PATH="$PWD/.venv/bin:$PATH" TOKENIZERS_PARALLELISM=false EVAL_WINDOWS=128
out=docs/results/input_chain/default_tp2/fresh_sets; d=docs/results/input_chain/default_tp2
text=$d/fresh_descriptions.txt
mkdir -p "$out/logs"
STEP_PREFIX=""; source scripts/benchmarks/steps.sh
eval_step base $text --checkpoint runs/loo21/ck
eval_step kl_scan $text --checkpoint runs/kl_scan21/ck
python scripts/tools/paired_eval.py $out/base.json $out/kl_scan.json --out $out/kl_scan_over_base.json
eval_step tp $text --spd-blocks none
for name in base kl_scan; do python scripts/tools/paired_eval.py $out/tp.json $out/$name.json --out $out/${name}_over_tp.json; done
default_set=$(spd_blocks_of docs/results/readme_path/default_tp2/cumulative_scan/plan21.json)
context_set=$(in_context_set $d/leave_one_out/summary.json 9)
for name in default context; do
  set_var=${name}_set
  eval_step "screen_$name" $text --checkpoint runs/readme30/checkpoint30 --spd-blocks "${!set_var}"
done
python scripts/tools/paired_eval.py $out/screen_default.json $out/screen_context.json --out $out/screen_context_over_default.json
