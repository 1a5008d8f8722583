"""Which tokens a distilled checkpoint's cost over TP sits on (virtual TP, one process): the per-token NLL
difference on a text, by position band, how concentrated it is (the share of the whole increase carried by the
costliest tokens) and the costliest tokens with the text before them.

    python scripts/experiments/token_costs.py --checkpoint runs/esb/ep8_seg64_rerun \
        --text docs/results/input_chain/default_tp2/confirmation.txt \
        --out docs/results/input_chain/default_tp2/leave_one_out/block1/token_costs.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

BANDS = ((0, 1), (1, 4), (4, 16), (16, 64), (64, None))
TOP = (10, 50, 200, 1000)


def main() -> None:
    import torch
    import torch.nn.functional as F

    from ds_spd.build import build_runner
    from ds_spd.config import resolve_spd_config
    from ds_spd.data import segments_for
    from ds_spd.run import resolve_run
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--checkpoint", required=True, help="the distilled checkpoint (against TP)")
    ap.add_argument("--text", required=True, help="a text file (its segments from the start, as eval reads)")
    ap.add_argument("--segments", type=int, default=32)
    ap.add_argument("--tp", type=int, default=2, help="virtual tp size")
    ap.add_argument("--show", type=int, default=30, help="costliest tokens listed")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    nll = {}
    for name, kw in (("tp", {"spd_blocks": []}), ("spd", {"checkpoint": args.checkpoint})):
        cfg = resolve_spd_config(None, model=args.model, tp_size=args.tp, **kw)
        runner = build_runner(resolve_run(cfg, virtual_tp=args.tp))
        data = cfg.data.model_copy(update={"text": [args.text], "split": "test", "max_samples": args.segments})
        ids = segments_for(data, runner.tokenizer)
        with torch.no_grad():
            lp = torch.cat([F.log_softmax(runner.hf_model(input_ids=s).logits[:, :-1].float(), -1)
                            .gather(-1, s[:, 1:, None])[..., 0] for s in ids.split(4)])
        nll[name] = -lp
    diff = nll["spd"] - nll["tp"]                    # [segments, positions]: what the checkpoint adds per token
    total = diff.sum().item()
    flat = diff.flatten()
    order = flat.argsort(descending=True)
    tok = runner.tokenizer
    costliest = []
    for j in order[:args.show].tolist():
        seg, pos = divmod(j, diff.shape[1])          # pos predicts token pos + 1 from the tokens up to pos
        costliest.append({"nats": round(flat[j].item(), 3), "position": pos,
                          "before": tok.decode(ids[seg, max(0, pos - 6):pos + 1]),
                          "next": tok.decode(ids[seg, pos + 1:pos + 2])})
    report = {
        "model": args.model, "checkpoint": args.checkpoint, "text": args.text, "segments": int(ids.shape[0]),
        "mean_nll_added": diff.mean().item(),
        "by_position": {f"{lo}-{hi or diff.shape[1]}": {"mean": diff[:, lo:hi].mean().item(),
                                                         "share": diff[:, lo:hi].sum().item() / total}
                        for lo, hi in BANDS},
        "share_of_costliest": {str(k): flat[order[:k]].sum().item() / total for k in TOP},
        "costliest": costliest}
    print(f"mean NLL added {report['mean_nll_added']:.4f} nats a token over {flat.numel()} tokens")
    for band, r in report["by_position"].items():
        print(f"  positions {band}: mean {r['mean']:+.4f}, share {r['share']:.2f}")
    for k, share in report["share_of_costliest"].items():
        print(f"  the costliest {k} tokens carry {share:.2f} of the increase")
    for c in costliest:
        print(f"  {c['nats']:6.2f}  {c['before']!r} -> {c['next']!r}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
