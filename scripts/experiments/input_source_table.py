"""The validation table of ``input_source_chain.sh``: each distillation variant against TP and against the paper's
original inputs on the three validation texts, paired 95% intervals, the mean of the three log-ratios (the choice
rule until the out-of-domain rule replaced it for SmolLM2's stage, docs/experiments.md), and what each distill took.
``--base`` pairs against another variant than the original inputs (the default of the day: ``lr1e-3`` on SmolLM2,
``lr2e-4`` on Gemma 3). Where a variant was also read on the confirmation text (``confirmation.txt``, read only
under that rule), a column says so.

    python scripts/experiments/input_source_table.py docs/results/input_chain/default_tp2
    python scripts/experiments/input_source_table.py docs/results/input_chain/default_tp2 --base lr1e-3
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
TEXTS = {"pydoc": "pydoc validation, 35 x 256", "shakespeare": "Shakespeare validation, 32 x 256",
         "ood": "second half of the descriptions, 32 x 256"}
CONFIRM = "confirm"   # the confirmation text: the first half of the descriptions after the test windows, 32 x 256


def main(out: str, base: str = "original") -> None:
    from ds_spd.tools.evaluation import paired_ratio_ci, percent
    load = lambda name: json.load(open(os.path.join(out, f"{name}.json")))
    pct = lambda r: percent(r, 2)
    runs = sorted({m.groups() for p in glob.glob(os.path.join(out, "distill*_*.json"))
                   if (m := re.match(r"distill(\d+)_([\w.+@-]+)\.json$", os.path.basename(p)))},
                  key=lambda r: (int(r[0]), r[1] != base, r[1]))
    summary, rows = {}, []
    for n, variant in runs:
        if not all(os.path.isfile(os.path.join(out, f"val_{t}_{n}_{variant}.json")) for t in TEXTS):
            continue
        distill = load(f"distill{n}_{variant}")
        kl = (distill.get("kl_stage") or {}).get("seconds")   # the end-to-end stage, after the blocks
        entry = {"seconds": distill["seconds"], "wall_seconds": distill["wall_seconds"], "kl_seconds": kl,
                 "vs_tp": {}, f"vs_{base}": {}}
        for t in TEXTS:
            tp, ev = load(f"val_{t}_tp"), load(f"val_{t}_{n}_{variant}")
            entry["vs_tp"][t] = paired_ratio_ci(tp, ev)
            if variant != base and os.path.isfile(os.path.join(out, f"val_{t}_{n}_{base}.json")):
                entry[f"vs_{base}"][t] = paired_ratio_ci(load(f"val_{t}_{n}_{base}"), ev)
        entry["mean_log_ratio_vs_tp"] = sum(math.log(r["ratio"]) for r in entry["vs_tp"].values()) / len(TEXTS)
        confirm = "—"
        if os.path.isfile(os.path.join(out, f"val_{CONFIRM}_{n}_{variant}.json")):
            ev = load(f"val_{CONFIRM}_{n}_{variant}")
            entry[CONFIRM] = {"vs_tp": paired_ratio_ci(load(f"val_{CONFIRM}_tp"), ev)}
            confirm = pct(entry[CONFIRM]["vs_tp"])
            if variant != base and os.path.isfile(os.path.join(out, f"val_{CONFIRM}_{n}_{base}.json")):
                entry[CONFIRM][f"vs_{base}"] = paired_ratio_ci(load(f"val_{CONFIRM}_{n}_{base}"), ev)
                confirm += f"; {pct(entry[CONFIRM][f'vs_{base}'])}"
        summary.setdefault(n, {})[variant] = entry
        over = " / ".join(pct(entry[f"vs_{base}"][t]) for t in TEXTS) if entry[f"vs_{base}"] else "—"
        rows.append(f"| {n} | {variant} | {' / '.join(pct(entry['vs_tp'][t]) for t in TEXTS)} | "
                    f"{100 * (math.exp(entry['mean_log_ratio_vs_tp']) - 1):+.2f}% | {over} | {confirm} | "
                    f"{distill['seconds'] / 60:.1f}{'' if kl is None else f' + {kl / 60:.1f}'} min |")
    name = "summary" if base == "original" else f"summary_vs_{base}"
    json.dump(summary, open(os.path.join(out, f"{name}.json"), "w"), indent=1)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(f"# Distillation variants on validation: {os.path.basename(out)}\n\n"
                f"`bash scripts/experiments/input_source_chain.sh` (commands in its header), then `python "
                f"scripts/experiments/input_source_table.py {os.path.relpath(out, ROOT)}"
                f"{'' if base == 'original' else ' --base ' + base}`. Perplexity over TP (virtual "
                f"tp 2) on {', '.join(TEXTS.values())} (in that order), paired 95% bootstrap; the mean of the three "
                f"log-ratios; the same over the {base} variant's checkpoint, paired; the confirmation text (the "
                f"first half of the descriptions after the test's windows), over TP and over {base}, where it was "
                "read. Which column chooses: docs/experiments.md (the mean of the three, then the out-of-domain "
                "rule for SmolLM2's stage). Training time: the trained blocks' epochs on 2 ranks (+ the end-to-end KL "
                "stage's, where it ran; beside other work).\n\n"
                f"| SPD blocks | variant | over TP (pydoc / Shakespeare / out of domain) | mean | over {base} | "
                f"confirmation: over TP; over {base} | training |\n|---|---|---|---|---|---|---|\n"
                + "\n".join(rows) + "\n")
    print(open(os.path.join(out, f"{name}.md")).read())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="an input_source_chain.sh results directory")
    parser.add_argument("--base", default="original", help="the variant the last column pairs against")
    args = parser.parse_args()
    main(args.out, args.base)
