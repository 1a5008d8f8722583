"""Screen for weight interpolation (WiSE-FT's robust fine-tuning, applied to distilled SPD blocks): each of a
checkpoint's SPD blocks at W0 + a (Wd - W0), W0 its original weights in the checkpoint's head/neuron order (the
student's starting point), Wd its distilled weights; a = 1 is the checkpoint. Distillation fits the calibration
text; part of the way back toward the original weights may keep more of the block's behaviour on other text.

    python scripts/experiments/interpolate_screen.py --checkpoint runs/loo21/ck --alphas 1,0.9,0.75,0.5 \
        --text docs/results/input_chain/default_tp2/second_half.txt --out F.json

Virtual tp 2; perplexity on 32 segments of each text, each alpha paired against a = 1 (95% bootstrap).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> None:
    import torch
    from tqdm import tqdm

    from ds_spd.build import build_runner
    from ds_spd.checkpoint import read_block_states
    from ds_spd.config import resolve_spd_config
    from ds_spd.core.layout import TPLayout
    from ds_spd.data import segments_for
    from ds_spd.plan import load_plan
    from ds_spd.run import resolve_run
    from ds_spd.stages.headgroup import HeadGrouping, permute_block
    from ds_spd.tools.evaluation import evaluate_lm, paired_ratio_ci
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--alphas", default="1,0.9,0.75,0.5")
    ap.add_argument("--text", required=True, help="comma-separated text files")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    alphas = [float(a) for a in args.alphas.split(",")]
    plan = load_plan(os.path.join(args.checkpoint, "plan.json"))
    cfg = resolve_spd_config(None, model=args.model, tp_size=2, checkpoint=args.checkpoint)
    runner = build_runner(resolve_run(cfg, virtual_tp=2))
    model = runner.hf_model
    layout = TPLayout.for_model(model.config, 2, cfg.tp_grain_size)
    distilled = read_block_states(args.checkpoint)
    # the original weights in the checkpoint's order: a fresh model's blocks, permuted as the plan says
    from ds_spd.models.loading import load_model
    fresh, _ = load_model(cfg.model, cfg.torch_dtype, config=model.config)
    units = layout.kv_heads if layout.kv_replicas == 1 else layout.q_heads   # the units each rank holds
    bounds = list(itertools.accumulate(units, initial=0))
    original, change = {}, {}
    for b in plan.blocks:
        if b.index not in distilled:
            continue
        layer = fresh.model.layers[b.index]
        if b.head_permutation is not None:   # the plan records the unit order, and the neuron order (neuron
            order, mlp = b.head_permutation, tuple(b.mlp_permutation or ())   # matching) or each rank's slice
            neurons = mlp if len(mlp) == sum(layout.mlp_cols) else ()
            groups = tuple(tuple(order[lo:hi]) for lo, hi in zip(bounds, bounds[1:]))
            permute_block(layer, HeadGrouping(groups, () if neurons else mlp, layout.mlp_cols, neurons), layout)
        state = layer.state_dict()
        original[b.index] = {k: state[k].clone() for k in distilled[b.index]}
        d, o = (torch.cat([s[k].flatten().float() for k in sorted(s)]) for s in (distilled[b.index], original[b.index]))
        change[b.index] = (d - o).norm().item() / o.norm().item()   # small where the order matches the student's
    del fresh
    print("relative change |Wd - W0| / |W0| per block:", {i: round(c, 4) for i, c in change.items()})
    tests = {t: segments_for(cfg.data.model_copy(update={"text": [t], "split": "test", "max_samples": 32}),
                             runner.tokenizer) for t in args.text.split(",")}
    own = model.state_dict()
    results = {}
    for a in tqdm(alphas, desc="alphas"):
        with torch.no_grad():
            for i, state in distilled.items():
                for k, wd in state.items():
                    w0 = original[i][k]
                    own[f"model.layers.{i}.{k}"].copy_(w0 + a * (wd.to(w0.dtype) - w0))
        results[a] = {t: evaluate_lm(model, s, progress=False) for t, s in tests.items()}
    report = {"checkpoint": args.checkpoint, "relative_change": change, "texts": {}}
    for t in tests:
        report["texts"][t] = {}
        for a in alphas:
            r = paired_ratio_ci(results[1.0][t], results[a][t]) if 1.0 in results else None
            report["texts"][t][str(a)] = {"perplexity": results[a][t]["perplexity"], "over_alpha1": r}
            print(f"{os.path.basename(t)} a={a}: {results[a][t]['perplexity']:.4f}"
                  + (f", {100 * (r['ratio'] - 1):+.2f}% [{100 * (r['ci95'][0] - 1):+.2f}, "
                     f"{100 * (r['ci95'][1] - 1):+.2f}] over a=1" if r else ""))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
