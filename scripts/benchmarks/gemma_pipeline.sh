#!/usr/bin/env bash
# The pipeline on Gemma 3 270M at tp N (one KV head, so KV heads are replicated on every rank), quick preset:
# scan (virtual TP, streamed) -> plan (70% of blocks) -> distill (ZeRO-2 on 2 data-parallel ranks, quick) ->
# eval on N real ranks and with --virtual-tp N (the perplexities must agree) -> generate on real ranks and
# virtually (the tokens must agree) -> bench (AutoTP with the same attention split vs SPD 0/70/100%).
#   bash scripts/benchmarks/gemma_pipeline.sh 4        # writes docs/results/gemma_pipeline/tp4/
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
tp=${1:?usage: gemma_pipeline.sh TP}
out=docs/results/gemma_pipeline/tp$tp; mkdir -p "$out/logs"
model=(--model gemma3-270m --tp "$tp")
data=(--max-samples 8 --seq-len 256)
json() { grep '^{' | tail -1; }
step() {  # NAME COMMAND...: run it with --json, keep its JSON line in $out/NAME.json
  local name=$1; shift
  echo "== $name: $*"
  "$@" --json 2> "$out/logs/$name.log" | json > "$out/$name.json" \
    || { echo "step '$name' failed; the end of $out/logs/$name.log:" >&2; tail -25 "$out/logs/$name.log" >&2; exit 1; }
}
rm -f "$out/plan.json" "$out/plan.png"
OMP_NUM_THREADS=2 step scan python -m ds_spd scan "${model[@]}" "${data[@]}" --out "$out/plan.json"
step plan_summary python -m ds_spd plan --plan "$out/plan.json" --spd-fraction 0.7
step distill launch/tp.sh 2 distill --model gemma3-270m --plan "$out/plan.json" --max-samples 16 --epochs 2 \
  --out "$out/checkpoint" --restart   # lr 2e-4: scaled to Gemma's weights by default (ds_spd.stages.lr)
step eval_tp launch/tp.sh "$tp" eval "${model[@]}" "${data[@]}" --spd-blocks none
step eval_real launch/tp.sh "$tp" eval "${model[@]}" "${data[@]}" --checkpoint "$out/checkpoint"
OMP_NUM_THREADS=2 step eval_virtual python -m ds_spd eval "${model[@]}" "${data[@]}" --checkpoint "$out/checkpoint" \
  --virtual-tp "$tp"
step generate_real launch/tp.sh "$tp" generate "${model[@]}" --checkpoint "$out/checkpoint" --max-new-tokens 16 \
  --prompt "The capital of France is"
OMP_NUM_THREADS=2 step generate_virtual python -m ds_spd generate "${model[@]}" --checkpoint "$out/checkpoint" \
  --max-new-tokens 16 --prompt "The capital of France is" --virtual-tp "$tp"
step bench launch/tp.sh "$tp" bench "${model[@]}" --plan "$out/plan.json" --fractions 0,0.7,1 --repeats 3 \
  --decode-batches 1 --decode-tokens 8 --prefill-len 64 --comm-paths auto --out "$out/bench"
rm -rf "$out/checkpoint" "$out/checkpoint.work"   # weights and training state: the JSON records what they held
python - "$out" "$tp" <<'EOF'
import json, sys
out, tp = sys.argv[1], sys.argv[2]
r = {k: json.load(open(f"{out}/{k}.json")) for k in ("plan_summary", "distill", "eval_tp", "eval_real", "eval_virtual",
                                                     "generate_real", "generate_virtual")}
real, virt = r["eval_real"], r["eval_virtual"]
g_real, g_virt = r["generate_real"]["generations"][0], r["generate_virtual"]["generations"][0]
same_tokens = g_real["token_ids"] == g_virt["token_ids"]
assert abs(real["perplexity"] / virt["perplexity"] - 1) < 1e-4, (real["perplexity"], virt["perplexity"])
assert same_tokens, (g_real["token_ids"], g_virt["token_ids"])
lines = ["<!-- written by ds_spd -->", f"# Gemma 3 270M, tp {tp} (KV head replicated on {tp} ranks), quick preset", "",
         f"`bash scripts/benchmarks/gemma_pipeline.sh {tp}` (pydoc test, {real['segments']} x {real['seq_len']} tokens)", "",
         "| step | result |", "|---|---|",
         f"| plan | {len(r['plan_summary']['spd_blocks'])} of 18 blocks SPD: {r['plan_summary']['spd_blocks']} |",
         f"| distill | {len(r['distill']['final_mse'])} blocks, epochs {r['distill']['epochs_trained']}, "
         f"{r['distill']['wall_seconds']:.0f} s |",
         f"| eval TP ({tp} real ranks) | perplexity {r['eval_tp']['perplexity']:.3f}, "
         f"{r['eval_tp']['allreduce_per_forward']:.0f} all-reduces/forward |",
         f"| eval SPD + checkpoint, {tp} real ranks | perplexity {real['perplexity']:.4f}, "
         f"{real['allreduce_per_forward']:.0f} all-reduces/forward |",
         f"| eval SPD + checkpoint, --virtual-tp {tp} | perplexity {virt['perplexity']:.4f} (equal) |",
         f"| generate, real == virtual tokens | {same_tokens}: {g_real['completion']!r} |",
         f"| bench | [bench/bench.md](bench/bench.md) |"]
open(f"{out}/summary.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
