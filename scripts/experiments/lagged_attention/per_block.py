"""Screen, blocks alone (no end-to-end stage): the lag on the blocks whose held-out calibration MSE trained with it is
lower than without, against every SPD block plain and every block with the lag. With original inputs a block's
distilled weights depend on itself only, so each block's weights come from its own run's work dir (plain or
lagged); virtual tp 2, ds_spd's own lagged block (``layer.lag`` per block), 32 windows of the text, paired.

    python scripts/experiments/lagged_attention/per_block.py --base-work runs/kl_scan21/ck.work \\
        --lag-work runs/lag21/ck.work --text docs/results/input_chain/default_tp2/second_half.txt \\
        --out docs/results/input_chain/default_tp2/lagged21/per_block.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.dirname(HERE))
MODES = ("plain", "all", "per-block")


def best_held_out(work: str, i: int) -> float:
    """A finished block's lowest held-out MSE, its untrained start included (the epoch distillation kept)."""
    with open(os.path.join(work, f"block{i:03d}.json")) as f:
        record = json.load(f)
    return min([record["start_val"], *record["val_history"]])


def main() -> None:
    from safetensors.torch import load_file

    from ds_spd.tools.evaluation import evaluate_lm, paired_ratio_ci
    from rank_shift_screen import runner_for, segments
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-work", required=True, help="the plain run's work dir (finished blocks)")
    ap.add_argument("--lag-work", required=True, help="the lagged run's work dir, beside its checkpoint")
    ap.add_argument("--text", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with open(os.path.join(args.lag_work.removesuffix(".work"), "plan.json")) as f:
        blocks = [b["index"] for b in json.load(f)["blocks"] if b["class"] != "TP"]
    chosen = [i for i in blocks if best_held_out(args.lag_work, i) < best_held_out(args.base_work, i)]
    cfg, runner = runner_for(blocks, None)
    model = runner.hf_model
    windows = segments(cfg, runner, args.text, 32)
    evals = {}
    for mode in MODES:
        for i in blocks:
            layer = model.model.layers[i]
            layer.lag = mode == "all" or (mode == "per-block" and i in chosen)
            work = args.lag_work if layer.lag else args.base_work
            layer.load_state_dict(load_file(os.path.join(work, f"block{i:03d}.safetensors")))
        evals[mode] = evaluate_lm(model, windows, progress=False)
    report = {"base_work": args.base_work, "lag_work": args.lag_work, "text": args.text, "spd_blocks": blocks,
              "lagged_per_block": chosen, "perplexity": {m: evals[m]["perplexity"] for m in MODES},
              "paired": {f"{b}_over_{a}": paired_ratio_ci(evals[a], evals[b])
                         for a, b in (("plain", "all"), ("plain", "per-block"), ("all", "per-block"))}}
    print(json.dumps(report, indent=1))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
