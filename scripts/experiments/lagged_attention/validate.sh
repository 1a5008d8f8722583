#!/usr/bin/env bash
# validate.sh N BASE: the README path's N-block plan (docs/results/readme_path/default_tp2/planN.json) distilled
# with today's defaults and the lagged attention output (`distill --lag`), against BASE (the same plan distilled
# without it), on the out-of-domain validation text, which decides, and the confirmation text; each over TP on the
# same windows, the KL to TP paired (entropy_check.py), and the blocks alone (per_block.py). Results in
# docs/results/input_chain/default_tp2/laggedN/, checkpoint in runs/lagN/ck; resumable (steps.sh's `step`).
# docs/experiments.md, "The other ranks' attention output one position late".
#
# The recorded runs' checkpoints were trained by an experiment patch of the block (its hooks, retired once ds_spd's
# own lagged block existed: git history of this directory) and their plan then marked "lag": true; ds_spd alone
# evaluates them to the patch's figures bitwise (21 of 30). A rerun trains with ds_spd's own block.
set -euo pipefail
n=${1:?usage: validate.sh N BASE_CHECKPOINT}; base=${2:?usage: validate.sh N BASE_CHECKPOINT}
cd "$(dirname "$0")/../../.."
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
d=docs/results/input_chain/default_tp2; out=$d/lagged$n; ck=runs/lag$n/ck
mkdir -p "$out/logs" "runs/lag$n"
STEP_PREFIX=""; source scripts/benchmarks/steps.sh
step "distill$n" nice -n 10 launch/tp.sh 2 distill --model default --lag \
  --plan "docs/results/readme_path/default_tp2/plan$n.json" --out "$ck"
for t in second_half confirmation; do
  tp=val_ood_tp; [[ $t == confirmation ]] && tp=val_confirm_tp   # TP on the same windows
  eval_step "${t}_base" "$d/$t.txt" --checkpoint "$base"
  eval_step "${t}_lag" "$d/$t.txt" --checkpoint "$ck"
  python scripts/tools/paired_eval.py "$d/$tp.json" "$out/${t}_lag.json" --out "$out/${t}_lag_over_tp.json"
  python scripts/tools/paired_eval.py "$d/$tp.json" "$out/${t}_base.json" --out "$out/${t}_base_over_tp.json"
  python scripts/tools/paired_eval.py "$out/${t}_base.json" "$out/${t}_lag.json" --out "$out/${t}_lag_over_base.json"
done
kl_step kl_ood "$d/second_half.txt" "$base,$ck"
# blocks alone (no stage): the lag per block where its held-out calibration MSE is lower, against plain and all
[[ -s $out/per_block.json ]] || OMP_NUM_THREADS=1 nice -n 5 python scripts/experiments/lagged_attention/per_block.py \
  --base-work "$base.work" --lag-work "$ck.work" --text "$d/second_half.txt" --out "$out/per_block.json"
