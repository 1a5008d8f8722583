"""Which sensitivity scan picks better SPD blocks? Held-out perplexity at equal SPD count.

Scans the calibration text (pydoc train split) with each method, then for N SPD blocks takes each method's
N least sensitive blocks and measures perplexity on held-out text (pydoc test split), zero-shot.

    OMP_NUM_THREADS=2 python scripts/experiments/compare_scans.py --tp 2 --out runs/scan_compare_tp2
"""
import argparse
import json
import os

import ds_spd
from ds_spd.data import load_texts, token_segments
from ds_spd.tools.evaluation import evaluate_lm
from ds_spd.models.loading import load_model
from ds_spd.plan import Plan
from ds_spd.stages.planner import ranking
from ds_spd.tools.plots import plot_count_curves, plot_plan, save_figure
from ds_spd.stages.scan import scan



def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--calibration-samples", type=int, default=16)
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--counts", default="5,10,15,20,25,30")
    p.add_argument("--variants", default="cumulative-ppl,isolated-ppl,isolated-kl", help="METHOD-METRIC,...")
    p.add_argument("--out", default="runs/scan_compare_tp2")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    model, tok = load_model("default")
    ds_spd.virtualize(model, args.tp)
    calib = token_segments(load_texts(None, "pydoc", "train"), tok, args.seq_len, args.calibration_samples, seed=0)
    held = token_segments(load_texts(None, "pydoc", "test"), tok, args.seq_len, args.eval_samples)
    counts = [int(c) for c in args.counts.split(",")]
    ds_spd.set_spd_blocks(model, [])
    baseline = evaluate_lm(model, held, 4, progress=False)
    results = {"args": vars(args), "held_out_baseline": baseline, "variants": {}}
    for method, metric in (v.split("-") for v in args.variants.split(",")):
        name = f"{method}-{metric}"
        r = scan(model, calib, 4, method, metric)
        plan = Plan.from_blocks("default", model.config, args.tp, [], data={"dataset": "pydoc", "split": "train"},
                                seq_len=args.seq_len, segments=args.calibration_samples, seed=0)
        for b in plan.blocks:
            b.sensitivity = r.sensitivity[b.index]
        plan.scan = {"method": method, "metric": metric, "baseline": r.baseline, "order": r.order,
                     "after": r.after, "seconds": r.seconds, "forwards_equivalent": r.forwards_equivalent}
        plan.save(os.path.join(args.out, f"plan_{name}.json"))
        plot_plan(plan, os.path.join(args.out, f"plan_{name}.png"))
        order = ranking(plan)
        curve = {}
        for n in counts:
            ds_spd.set_spd_blocks(model, order[:n])
            curve[n] = evaluate_lm(model, held, 4, progress=False)
        ds_spd.set_spd_blocks(model, [])
        results["variants"][name] = {"scan_seconds": r.seconds, "order": order,
                                     "held_out": {str(n): v for n, v in curve.items()}}
        print(name, {n: round(v["perplexity"], 3) for n, v in curve.items()}, flush=True)
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump(results, f, indent=2)
    _plot(results, counts, os.path.join(args.out, "compare.png"))
    _table(results, counts, os.path.join(args.out, "compare.md"))


def _plot(results, counts, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    plot_count_curves(ax, counts, {name: v["held_out"] for name, v in results["variants"].items()}, "perplexity",
                      results["held_out_baseline"]["perplexity"], "no SPD")
    ax.set(yscale="log", title=f"SmolLM2-135M, virtual tp={results['args']['tp']}, zero-shot SPD")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def _table(results, counts, path):
    base = results["held_out_baseline"]["perplexity"]
    lines = ["| scan | " + " | ".join(f"{n} SPD" for n in counts) + " |", "|---" * (len(counts) + 1) + "|"]
    for name, v in results["variants"].items():
        cells = [f"{v['held_out'][str(n)]['perplexity']:.2f} ({100 * (v['held_out'][str(n)]['perplexity'] / base - 1):+.1f}%)"
                 for n in counts]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    with open(path, "w") as f:
        f.write(f"held-out baseline perplexity (no SPD): {base:.3f}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
