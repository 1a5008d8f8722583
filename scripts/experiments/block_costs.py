"""Where SPD's cost sits, block by block: each block's perplexity cost in SPD form, zero-shot and after
distillation, at several tp sizes, from the scans `recovery_recipes.py` cached (its results.json files).

Zero-shot: the cumulative scan's added perplexity when the block joins (`--rank-on` corpus); distilled: the
block alone in SPD form with its distilled weights (ds_spd.stages.scan.scan_distilled, the recipe's calibration
text). Both in % of the scan's own baseline, so the two tp sizes compare.

    python scripts/experiments/block_costs.py --recipe n64mix_lr5e-5 --zero-shot-scan zero_shot:pydoc \\
        --run 2=docs/results/gemma_recovery/results_tp2.json --run 4=docs/results/gemma_recovery/results_tp4.json \\
        --out docs/results/gemma_recovery/block_costs
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def costs(results: dict, key: str) -> list[float] | None:
    scan = results.get("scans", {}).get(key)
    if scan is None:
        return None
    return [100 * s / scan["baseline"] for s in scan["sensitivity"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", required=True, help="the recipe whose distilled scan to show (TP=PATH@RECIPE for "
                   "another in one run)")
    p.add_argument("--zero-shot-scan", default="zero_shot:pydoc")
    p.add_argument("--run", action="append", required=True, help="TP=results.json[@RECIPE] (repeatable)")
    p.add_argument("--out", required=True, help="path prefix: writes PREFIX.md and PREFIX.png")
    args = p.parse_args()
    table: dict[int, dict[str, list[float] | None]] = {}
    recipes = {}
    for spec in args.run:
        tp, path = spec.split("=", 1)
        path, _, recipe = path.partition("@")
        recipes[int(tp)] = recipe = recipe or args.recipe
        try:
            with open(path) as f:
                results = json.load(f)
        except (OSError, ValueError) as err:
            sys.exit(f"--run {spec}: {err}")
        table[int(tp)] = {"zero-shot": costs(results, args.zero_shot_scan),
                          "distilled": costs(results, f"distilled:{recipe}")}
    n = max(len(c) for row in table.values() for c in row.values() if c)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    head = "| block | " + " | ".join(f"tp {tp} {kind}" for tp in table for kind in table[tp]) + " |"
    lines = ["# Per-block cost of SPD, % perplexity (zero-shot: cumulative scan; distilled: each block alone; "
             + ", ".join(f"tp {tp}: {r}" for tp, r in recipes.items()) + ")", "", "`python " + " ".join(sys.argv) + "`", "", head,
             "|" + "---|" * (1 + sum(len(r) for r in table.values()))]
    for i in range(n):
        cells = [f"{c[i]:+.1f}" if c else "-" for tp in table for c in table[tp].values()]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharex=True)
    for ax, kind in zip(axes, ("zero-shot", "distilled")):
        width = 0.8 / len(table)
        for k, (tp, row) in enumerate(table.items()):
            if row[kind]:
                ax.bar([i + (k - (len(table) - 1) / 2) * width for i in range(n)], row[kind], width,
                       label=f"tp {tp}" + (f" ({recipes[tp]})" if kind == "distilled" else ""))
        ax.set_yscale("symlog", linthresh=5)
        ax.axhline(5, color="grey", lw=0.8, ls="--", label="+5%")
        ax.set_xticks(range(n))
        ax.set_title("distilled, each block alone" if kind == "distilled" else "zero-shot (cumulative scan)")
        ax.set_xlabel("block")
        ax.set_ylabel("perplexity cost, % of the scan's baseline")
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=110)
    print(f"wrote {args.out}.md and {args.out}.png")


if __name__ == "__main__":
    main()
