#!/usr/bin/env bash
# The README's path with every default, on a shipped model: scan -> plan (N blocks) -> distill (2 data-parallel
# ranks, as the README's deepspeed command) -> eval against TP on text neither calibration corpus resembles (the
# pinned packages' descriptions, 32 x 256 tokens, the unseen text of docs/recovery.md), paired 95% intervals.
#   bash scripts/benchmarks/readme_path.sh gemma3-270m 2 5,9    # writes docs/results/readme_path/gemma3-270m_tp2/
#   bash scripts/benchmarks/readme_path.sh default 2 15,21        # SmolLM2
# A step whose JSON is already there is not run again (delete the directory to start over); weights and training
# state are removed at the end, the JSON records what they held (KEEP_CHECKPOINTS=1 keeps the checkpoints, e.g. for
# scripts/experiments/entropy_check.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
model=${1:?usage: readme_path.sh MODEL TP COUNTS}; tp=${2:?TP}; counts=${3:?COUNTS, e.g. 5,9}
out=docs/results/readme_path/${model}_tp$tp; mkdir -p "$out/logs"
source scripts/benchmarks/steps.sh
unseen=$(python -c "import sys; sys.path.insert(0, 'scripts/experiments'); import recovery_recipes as r; \
print(r.unseen_text('$out'))")
text=(--text "$unseen" --max-samples 32)
OMP_NUM_THREADS=2 step scan python -m ds_spd scan --model "$model" --tp "$tp" --out "$out/scanned.json"
OMP_NUM_THREADS=2 step eval_tp python -m ds_spd eval --model "$model" --virtual-tp "$tp" --spd-blocks none "${text[@]}"
for n in ${counts//,/ }; do
  step "plan$n" python -m ds_spd plan --plan "$out/scanned.json" --spd-count "$n" --out "$out/plan$n.json"
  step "distill$n" launch/tp.sh 2 distill --model "$model" --plan "$out/plan$n.json" --out "$out/checkpoint$n"
  OMP_NUM_THREADS=2 step "eval$n" python -m ds_spd eval --model "$model" --virtual-tp "$tp" \
    --checkpoint "$out/checkpoint$n" "${text[@]}"
  OMP_NUM_THREADS=2 step "zero_shot$n" python -m ds_spd eval --model "$model" --virtual-tp "$tp" \
    --plan "$out/plan$n.json" "${text[@]}"
  # how far the distilled model's next-token distribution is from TP's (a perplexity ratio alone rewards a flatter
  # model on text where TP is over-confident: docs/experiments.md, Gemma 3 at 13 of 18)
  OMP_NUM_THREADS=2 step "kl$n" python scripts/experiments/entropy_check.py --model "$model" --tp "$tp" \
    --text "$unseen" --segments 32 --checkpoints "$out/checkpoint$n" --before-kl-stage
  [[ -n "${KEEP_CHECKPOINTS:-}" ]] || rm -rf "$out/checkpoint$n" "$out/checkpoint$n.work"
done
if [[ -d "$out/scanned.ranking/checkpoint" ]]; then   # a distilled ranking's weights: keep what they were
  cp "$out/scanned.ranking/checkpoint/provenance.json" "$out/ranking_provenance.json"
  rm -rf "$out/scanned.ranking/checkpoint" "$out/scanned.ranking/checkpoint.work"
fi
python - "$out" "$model" "$tp" "$counts" <<'EOF'
import json, os, sys
sys.path.insert(0, ".")
from ds_spd.tools.evaluation import paired_ratio_ci, percent
out, model, tp, counts = sys.argv[1], sys.argv[2], sys.argv[3], [int(c) for c in sys.argv[4].split(",")]
load = lambda name: json.load(open(f"{out}/step_{name}.json"))
tp_eval, scan = load("eval_tp"), load("scan")
rows, notes, summary = [], [], {"model": model, "tp": int(tp), "tp_perplexity": tp_eval["perplexity"],
                     "tokens": tp_eval["tokens"], "counts": {}}
for n in counts:
    plan, distill = json.load(open(f"{out}/plan{n}.json")), load(f"distill{n}")
    classes = {int(b["index"]): b["class"] for b in plan["blocks"] if b["class"] != "TP"}
    trained = sorted(int(k) for k in distill["final_mse"])
    zero, dist = paired_ratio_ci(tp_eval, load(f"zero_shot{n}")), paired_ratio_ci(tp_eval, load(f"eval{n}"))
    kl = (distill.get("kl_stage") or {}).get("seconds")   # the end-to-end stage after the blocks, where it ran
    kl_file = f"{out}/step_kl{n}.json"   # the distilled model against TP's distribution, where measured
    measured = json.load(open(kl_file)) if os.path.exists(kl_file) else {}
    to_tp, base, blocks = (measured.get(k) for k in (f"{out}/checkpoint{n}", "tp", f"{out}/checkpoint{n}:blocks"))
    gap = blocks["kl_to_tp_minus_first"] if blocks else None   # the blocks alone minus the distilled model, paired
    stats = lambda r: {k: r[k] for k in ("kl_to_tp", "entropy", "cross_entropy", "top1_agrees_with_tp")}
    summary["counts"][n] = {"blocks": sorted(classes), "classes": classes, "trained": trained,
                            "zero_shot": zero, "distilled": dist, "lr": distill.get("lr"),
                            "distill_seconds": distill["seconds"], "kl_stage_seconds": kl,
                            "against_tp": {"distilled": stats(to_tp), "tp": stats(base),
                                           "blocks_alone": {**stats(blocks), "kl_minus_distilled": gap}
                                           if blocks else None}
                            if to_tp else None}
    if to_tp:
        kl_ci = to_tp["kl_to_tp"]["ci95"]
        notes.append(f"{n} of {len(plan['blocks'])}: KL to TP {to_tp['kl_to_tp']['mean']:.3f} nats a token "
                     f"[{kl_ci[0]:.3f}, {kl_ci[1]:.3f}], the same top-1 token "
                     f"{to_tp['top1_agrees_with_tp']['mean']:.1%}; "
                     f"entropy {to_tp['entropy']['mean']:.2f} (TP {base['entropy']['mean']:.2f}), cross-entropy "
                     f"{to_tp['cross_entropy']['mean']:.2f} (TP {base['cross_entropy']['mean']:.2f})"
                     + (f"; the blocks before the KL stage: KL to TP {blocks['kl_to_tp']['mean']:.3f}, the stage "
                        f"{0.0 - gap['mean']:+.3f} [{0.0 - gap['ci95'][1]:+.3f}, {0.0 - gap['ci95'][0]:+.3f}] "
                        "paired, entropy "
                        f"{blocks['entropy']['mean']:.2f}" if blocks and kl else ""))
    rows.append(f"| {n} of {len(plan['blocks'])} | {sorted(classes)} | {len(trained)} of {len(classes)} | "
                f"{percent(zero)} | **{percent(dist)}** | {distill['seconds'] / 60:.0f} min"
                + (f" + {kl / 60:.0f} min KL stage |" if kl else " |"))
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
with open(f"{out}/summary.md", "w") as f:
    f.write(f"# The README's path with defaults: {model}, tp {tp}\n\n`bash scripts/benchmarks/readme_path.sh {model} {tp} "
            f"{sys.argv[4]}`: scan ({scan['ranking']} ranking, {scan['method']} scan, {scan['seconds'] / 60:.1f} min) -> plan "
            f"--spd-count N -> distill on 2 ranks -> eval, virtual tp {tp}, on the unseen text (the pinned packages' "
            f"descriptions, {tp_eval['segments']} x {tp_eval['seq_len']} tokens; TP perplexity "
            f"{tp_eval['perplexity']:.2f}). Perplexity over TP, paired 95% bootstrap interval.\n\n"
            "| SPD blocks | chosen | trained | zero-shot | after `distill` | training time (the blocks' epochs; the KL "
            "stage) |\n|---|---|---|---|---|---|\n")
    f.write("\n".join(rows) + "\n")
    if notes:
        f.write("\nThe distilled model against TP's next-token distribution on the same text (per token, 95% "
                "bootstrap intervals over segments; `scripts/experiments/entropy_check.py`):\n\n"
                + "\n".join(f"- {x}" for x in notes) + "\n")
print(open(f"{out}/summary.md").read())
EOF
