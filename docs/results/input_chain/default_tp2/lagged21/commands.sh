# The commands that produced this directory's files (run from the repository root; resumable, steps.sh's `step`):
# the README path's 21-block plan distilled with today's defaults and the lagged attention output (the experiment
# patch, scripts/experiments/lagged_attention/), against the README path's 21-block model (runs/kl_scan21/ck, the
# same model to the last digit of its KL) on the out-of-domain validation text, which decides, and the confirmation
# text (docs/experiments.md, "The other ranks' attention output one position late").
set -euo pipefail
cd "$(dirname "$0")/../../../../.."
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
out=docs/results/input_chain/default_tp2/lagged21; d=docs/results/input_chain/default_tp2
base=runs/kl_scan21/ck; ck=runs/lag21/ck
mkdir -p "$out/logs" runs/lag21
STEP_PREFIX=""; source scripts/benchmarks/steps.sh
lag() { PYTHONPATH="$PWD/scripts/experiments/lagged_attention" DS_SPD_LAG=1 "$@"; }
lag step distill21 nice -n 10 launch/tp.sh 2 distill --model default \
  --plan docs/results/readme_path/default_tp2/plan21.json --out $ck
for t in second_half confirmation; do
  tp=val_ood_tp; [[ $t == confirmation ]] && tp=val_confirm_tp   # TP on the same windows
  lag eval_step "${t}_lag" $d/$t.txt --checkpoint $ck
  python scripts/tools/paired_eval.py $d/$tp.json $out/${t}_lag.json --out $out/${t}_lag_over_tp.json
  python scripts/tools/paired_eval.py $d/kl_scan21/${t}_kl_scan.json $out/${t}_lag.json --out $out/${t}_lag_over_base.json
done
[[ -s $out/kl_ood.json ]] || OMP_NUM_THREADS=2 lag nice -n 10 python scripts/experiments/lagged_attention/compare.py \
  --base $base --lag $ck --text $d/second_half.txt --out $out/kl_ood.json
