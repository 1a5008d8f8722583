# The commands that produced this directory's files (run from the repository root; resumable, steps.sh's `step`):
# the KL scan's 21-block plan distilled with today's defaults, against the default's 21-block model
# (docs/experiments.md, "Gemma's scan for SmolLM2, under today's training").
set -euo pipefail
cd "$(dirname "$0")/../../../../.."
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
out=docs/results/input_chain/default_tp2/kl_scan21; d=docs/results/input_chain/default_tp2
base=runs/loo21/ck; ck=runs/kl_scan21/ck
mkdir -p "$out/logs" runs/kl_scan21
STEP_PREFIX=""; source scripts/benchmarks/steps.sh
step distill21 nice -n 10 launch/tp.sh 2 distill --model default \
  --plan docs/results/readme_path/default_tp2/kl_scan/plan21.json --out $ck
for t in second_half confirmation; do
  for name in base kl_scan; do
    c=$base; [[ $name == kl_scan ]] && c=$ck
    eval_step "${t}_$name" $d/$t.txt --checkpoint $c
  done
done
kl_step kl_ood $d/second_half.txt $base,$ck
