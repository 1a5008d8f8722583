"""SmolLM2 recovery report: held-out perplexity / accuracy vs number of SPD blocks for zero-shot SPD,
+B2B distillation, and +head grouping +B2B, at one tp size; plus the plan pipeline (ISB zero-shot, SB B2B,
ESB HG+B2B) and, optionally, which block-input source recovers more.

Blocks distilled from the original model's inputs do not depend on which other blocks are SPD, so every
block is distilled once per variant (one ZeRO engine, `ds-spd distill`) and each curve point loads the
distilled weights of its N least sensitive blocks.

    OMP_NUM_THREADS=2 python scripts/experiments/distill_report.py --tp 2 --plan runs/scan_compare_tp2/plan_cumulative-ppl.json \
        --out runs/distill_tp2 --compare-input-source 15
"""
import argparse
import json
import os
import subprocess
import sys

import torch

import ds_spd
from ds_spd.checkpoint import apply_checkpoint, open_checkpoint
from ds_spd.data import load_texts, token_segments
from ds_spd.tools.evaluation import evaluate_lm
from ds_spd.models.loading import load_model
from ds_spd.plan import load_plan
from ds_spd.tools.plots import plot_count_curves, save_figure
from ds_spd.stages.planner import ranking, select


def run(cmd):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def distill_cli(args, plan_path, out, extra=()):
    if os.path.isfile(os.path.join(out, "spd_blocks.safetensors")):
        return out
    run([sys.executable, "-m", "ds_spd", "distill", "--config", f"configs/spd_smollm2_tp{args.tp}.json",
         "--plan", plan_path, "--out", out, "--epochs", str(args.epochs), "--max-samples", str(args.calibration_samples),
         "--lr", str(args.lr), *extra])
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--plan", required=True, help="a scanned plan (sensitivities) for this tp size")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--calibration-samples", type=int, default=32)
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--counts", default="5,10,15,20,25,30")
    p.add_argument("--compare-input-source", type=int, default=0, metavar="N",
                   help="also distill the N-block plan from the SPD prefix's inputs and compare")
    p.add_argument("--out", default="runs/distill_tp2")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    scanned = load_plan(args.plan)
    n_layers = len(scanned.blocks)
    order = ranking(scanned)
    ckpts = {}
    for variant, cls in (("b2b", "SB"), ("hg_b2b", "ESB")):
        every = select(scanned, count=n_layers)
        for b in every.blocks:
            b.cls = cls
        path = os.path.join(args.out, f"plan_all_{cls}.json")
        every.save(path)
        ckpts[variant] = distill_cli(args, path, os.path.join(args.out, variant))

    model, tok = load_model("default")
    ds_spd.virtualize(model, args.tp)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    held = token_segments(load_texts(None, "pydoc", "test"), tok, 256, args.eval_samples)

    def measure(blocks, weights=()):
        model.load_state_dict(base_state)
        for ckpt, chosen in weights:
            apply_checkpoint(model, open_checkpoint(ckpt, model.config, args.tp, spd_blocks=chosen))
        ds_spd.set_spd_blocks(model, blocks)
        return evaluate_lm(model, held, 4, progress=False)

    counts = [int(c) for c in args.counts.split(",")]
    report = {"args": vars(args), "baseline": measure([]), "curves": {}, "distill": {}}
    for variant, ckpt in ckpts.items():
        report["distill"][variant] = json.load(open(os.path.join(ckpt, "provenance.json")))
        report["distill"][variant].pop("history", None)
    for variant in ("zero_shot", "b2b", "hg_b2b"):
        curve = {}
        for n in counts:
            blocks = order[:n]
            curve[str(n)] = measure(blocks, [] if variant == "zero_shot" else [(ckpts[variant], blocks)])
        report["curves"][variant] = curve
        print(variant, {n: round(v["perplexity"], 3) for n, v in curve.items()}, flush=True)
    # the plan pipeline at each N: ISB zero-shot, SB from the B2B run, ESB from the HG+B2B run
    pipeline = {}
    for n in counts:
        plan = select(scanned, count=n)
        sb = [b.index for b in plan.blocks if b.cls == "SB"]
        esb = [b.index for b in plan.blocks if b.cls == "ESB"]
        pipeline[str(n)] = {**measure(plan.spd_blocks, [(ckpts["b2b"], sb), (ckpts["hg_b2b"], esb)]),
                            "classes": {c: [b.index for b in plan.blocks if b.cls == c] for c in ("ISB", "SB", "ESB")}}
    report["curves"]["plan_pipeline"] = pipeline
    print("plan_pipeline", {n: round(v["perplexity"], 3) for n, v in pipeline.items()}, flush=True)
    if args.compare_input_source:
        n = args.compare_input_source
        plan = select(scanned, count=n)
        for b in plan.blocks:  # every chosen block distilled (B2B), to isolate the input source
            if b.cls != "TP":
                b.cls = "SB"
        path = os.path.join(args.out, f"plan_{n}_SB.json")
        plan.save(path)
        prefix = distill_cli(args, path, os.path.join(args.out, f"prefix_{n}"), ["--input-source", "prefix"])
        report["input_source"] = {"spd_count": n,
                                  "original": measure(plan.spd_blocks, [(ckpts["b2b"], plan.spd_blocks)]),
                                  "prefix": measure(plan.spd_blocks, [(prefix, plan.spd_blocks)]),
                                  "zero_shot": measure(plan.spd_blocks)}
        print("input source", {k: round(v["perplexity"], 3) for k, v in report["input_source"].items()
                               if isinstance(v, dict)}, flush=True)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    _plot(report, counts, os.path.join(args.out, "recovery.png"))
    _table(report, counts, os.path.join(args.out, "recovery.md"))


def _plot(report, counts, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in ((a1, "perplexity"), (a2, "accuracy")):
        plot_count_curves(ax, counts, report["curves"], key, report["baseline"][key])
    a1.axhline(report["baseline"]["perplexity"] * 1.05, color="gray", ls=":", label="+5%")
    a1.set_yscale("log")
    a1.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M, tp={report['args']['tp']}: recovery of SPD blocks")
    fig.tight_layout()
    save_figure(fig, path)


def _table(report, counts, path):
    base = report["baseline"]
    lines = [f"TP baseline: perplexity {base['perplexity']:.3f}, top-1 accuracy {base['accuracy']:.4f}", "",
             "| variant | " + " | ".join(f"{n} SPD" for n in counts) + " |", "|---" * (len(counts) + 1) + "|"]
    for name, curve in report["curves"].items():
        lines.append(f"| {name} | " + " | ".join(
            f"{curve[str(n)]['perplexity']:.2f} ({100 * (curve[str(n)]['perplexity'] / base['perplexity'] - 1):+.1f}%), "
            f"{curve[str(n)]['accuracy']:.3f}" for n in counts) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
