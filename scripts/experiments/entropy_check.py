"""Cross-entropy, predictive entropy and KL to TP of distilled checkpoints against TP, on a few validation
segments (virtual tp 2, one process): whether a perplexity below TP's is recovery toward TP or a flatter model.

    ck=runs/chain/gemma3-270m_tp2/ck13_adddocstrings
    python scripts/experiments/entropy_check.py --model gemma3-270m --segments 4 --checkpoints $ck,$ck+kl2+kllr5e-5 \
        --out docs/results/input_chain/gemma3-270m_tp2/entropy/entropy13.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> None:
    import torch
    import torch.nn.functional as F

    from ds_spd.build import build_runner
    from ds_spd.config import resolve_spd_config
    from ds_spd.data import segments_for
    from ds_spd.run import resolve_run
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--checkpoints", required=True, help="comma-separated distill checkpoints")
    ap.add_argument("--dataset", default="pydoc")
    ap.add_argument("--segments", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results, tp = {}, None
    for name in ["tp", *args.checkpoints.split(",")]:
        kw = {"spd_blocks": []} if name == "tp" else {"checkpoint": name}
        cfg = resolve_spd_config(None, model=args.model, tp_size=2, **kw)
        runner = build_runner(resolve_run(cfg, virtual_tp=2))
        data = cfg.data.model_copy(update={"dataset": args.dataset, "split": "validation",
                                           "max_samples": args.segments})
        ids = segments_for(data, runner.tokenizer)
        with torch.no_grad():
            lp = F.log_softmax(runner.hf_model(input_ids=ids).logits[:, :-1].float(), -1)
        tp = lp if tp is None else tp
        results[name] = {"cross_entropy": -lp.gather(-1, ids[:, 1:, None]).mean().item(),
                         "entropy": -(lp.exp() * lp).sum(-1).mean().item(),
                         "kl_to_tp": (tp.exp() * (tp - lp)).sum(-1).mean().item()}
        print(name, json.dumps(results[name]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "dataset": args.dataset, "segments": args.segments, **results}, f, indent=1)


if __name__ == "__main__":
    main()
