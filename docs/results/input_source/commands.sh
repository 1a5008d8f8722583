#!/usr/bin/env bash
# original vs prefix block inputs: same plan (the demo's 15 blocks: run `make demo` first), quick preset,
# paired evaluation on the validation splits; the JSON files beside this script are its outputs
set -euo pipefail
cd "$(dirname "$0")/../../.."   # repository root
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
cfg=configs/spd_smollm2_tp2.json; o=runs/prefix_cmp; mkdir -p $o
json() { grep '^{' | tail -1; }
for src in original prefix; do
  launch/tp.sh 2 distill --config $cfg --plan runs/demo/plan.json --max-samples 16 --epochs 4 --input-source $src \
    --out $o/ckpt_$src --restart --json 2> $o/distill_$src.log | json > $o/distill_$src.json
done
for ds in pydoc shakespeare; do
  n=$([ $ds = pydoc ] && echo 35 || echo 32)
  launch/tp.sh 2 eval --config $cfg --spd-blocks none --dataset $ds --split validation --max-samples $n --json 2>/dev/null | json > $o/eval_${ds}_tp.json
  for src in original prefix; do
    launch/tp.sh 2 eval --config $cfg --checkpoint $o/ckpt_$src --dataset $ds --split validation --max-samples $n --json 2>/dev/null | json > $o/eval_${ds}_$src.json
  done
done
for ds in pydoc shakespeare; do
  for src in original prefix; do python scripts/tools/paired_eval.py $o/eval_${ds}_tp.json $o/eval_${ds}_$src.json --out $o/ratio_${ds}_${src}_vs_tp.json; done
  python scripts/tools/paired_eval.py $o/eval_${ds}_original.json $o/eval_${ds}_prefix.json --out $o/ratio_${ds}_prefix_vs_original.json
done
