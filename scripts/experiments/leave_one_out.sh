#!/usr/bin/env bash
# Where a checkpoint's cost sits, block by block: for each of its plan's SPD blocks k, the model with block k back in
# TP form (its original weights) and the plan's other SPD blocks in SPD form, on a text; the table and plot say how
# much each block adds over TP (the full model over the model without block k, paired 95% bootstrap).
#   bash scripts/experiments/leave_one_out.sh runs/chain/default_tp2/ck30_adddocstrings+kl1+kllr1e-4+klseg512+klbf16 \
#       docs/results/input_chain/default_tp2/confirmation.txt docs/results/input_chain/default_tp2/leave_one_out
# Resumable: a block whose JSON exists is not evaluated again.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
ck=${1:?usage: leave_one_out.sh CHECKPOINT TEXT OUT [MODEL] [TP]}; text=${2:?TEXT}; out=${3:?OUT}
model=${4:-default}; tp=${5:-2}
mkdir -p "$out/logs"
# the plan's block count, then its SPD blocks
read -r blocks spd <<< "$(python -c "import json, sys; b = json.load(open(sys.argv[1] + '/plan.json'))['blocks']
print(len(b), *(e['index'] for e in b if e['class'] != 'TP'))" "$ck")"
source scripts/benchmarks/steps.sh
STEP_PREFIX=""
run() {  # NAME BLOCKS: an eval of the checkpoint with those blocks in SPD form (its JSON $out/NAME.json)
  step "$1" python -m ds_spd eval --model "$model" --virtual-tp "$tp" --checkpoint "$ck" --spd-blocks "$2" \
    --text "$text" --max-samples 32
}
run tp none
run all "$(echo $spd | tr ' ' ,)"
for k in $spd; do
  run "without$k" "$(echo $spd | tr ' ' '\n' | grep -vx "$k" | paste -sd, -)"
  echo "block $k"
done
python - "$out" "$blocks" $spd <<'PY'
import json, math, sys
sys.path.insert(0, ".")
from ds_spd.tools.evaluation import paired_ratio_ci, percent
out, total_blocks, blocks = sys.argv[1], int(sys.argv[2]), [int(k) for k in sys.argv[3:]]
n = len(blocks)
every = "Every block" if n == total_blocks else f"The plan's {n} SPD blocks (of {total_blocks})"
load = lambda name: json.load(open(f"{out}/{name}.json"))
full, tp = load("all"), load("tp")
rows = {k: paired_ratio_ci(load(f"without{k}"), full) for k in blocks}
total = paired_ratio_ci(tp, full)
json.dump({"all_over_tp": total, "block_adds": rows}, open(f"{out}/summary.json", "w"), indent=1)
pct = lambda r: percent(r, 2)
lines = [f"| {k} | {pct(r)} |" for k, r in sorted(rows.items(), key=lambda kv: -kv[1]["ratio"])]
with open(f"{out}/summary.md", "w") as f:
    f.write(f"# Each block's share of the {'all-block' if n == total_blocks else f'{n}-block'} cost\n\n"
            f"`bash scripts/experiments/leave_one_out.sh` (its header). {every} in SPD form: {pct(total)} over TP. "
            "What each block adds: the full model over the model "
            f"with that block back in TP form, paired 95% bootstrap (the shares sum to "
            f"{100 * (math.exp(sum(math.log(r['ratio']) for r in rows.values())) - 1):+.1f}%, the blocks "
            "interact).\n\n| block | adds |\n|---|---|\n" + "\n".join(lines) + "\n")
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(9, 3.2))
ks = blocks
ax.bar(ks, [100 * (rows[k]["ratio"] - 1) for k in ks],
       yerr=[[100 * (rows[k]["ratio"] - rows[k]["ci95"][0]) for k in ks],
             [100 * (rows[k]["ci95"][1] - rows[k]["ratio"]) for k in ks]], color="tab:red", capsize=2)
ax.set_xlabel("block back in TP form"); ax.set_ylabel("% it adds to the perplexity")
ax.set_title(f"{'all ' if n == total_blocks else ''}{n} blocks in SPD form: {pct(total)} over TP; each block's share")
ax.set_xticks(ks); fig.tight_layout(); fig.savefig(f"{out}/summary.png", dpi=110)
print(open(f"{out}/summary.md").read())
PY
