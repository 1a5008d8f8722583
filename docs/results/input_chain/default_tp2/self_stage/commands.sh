# The commands that produced this directory's files (run from the repository root; resumable, steps.sh's `step`):
# the stage on text the model wrote itself as a fourth corpus (docs/experiments.md, "The stage on the model's own
# text"), the blocks of the README path's 30-block run reused, against that run's checkpoint.
set -euo pipefail
cd "$(dirname "$0")/../../../../.."
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
out=docs/results/input_chain/default_tp2/self_stage; d=docs/results/input_chain/default_tp2
base=runs/readme30/checkpoint30; gen=runs/selfgen   # a directory: `datasets` reads train.txt as its train split
mkdir -p "$out/logs" $gen
STEP_PREFIX=""; source scripts/benchmarks/steps.sh
[[ -s $gen/train.txt ]] || OMP_NUM_THREADS=2 python scripts/experiments/self_generated_text.py --model default \
  --sequences 240 --out $gen/train.txt
for n in 30; do
  ck=runs/selfgen/ck$n
  step "distill$n" nice -n 10 launch/tp.sh 2 distill --model default \
    --plan docs/results/readme_path/default_tp2/cumulative_scan/plan$n.json --work-dir $base.work --out $ck \
    --kl-corpora pydoc+shakespeare+docstrings+$gen
  eval_step "ood_base$n" $d/second_half.txt --checkpoint $base
  eval_step "ood_self$n" $d/second_half.txt --checkpoint $ck
  eval_step "confirm_base$n" $d/confirmation.txt --checkpoint $base
  eval_step "confirm_self$n" $d/confirmation.txt --checkpoint $ck
  kl_step "kl_ood$n" $d/second_half.txt $base,$ck
done
