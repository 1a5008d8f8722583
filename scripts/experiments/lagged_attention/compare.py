"""KL to TP per token of a checkpoint distilled with the lag (run with it) against one without (run without it), on
the same windows of a text, paired by window (virtual TP, one process; needs the patch: PYTHONPATH and DS_SPD_LAG=1
as in sitecustomize.py's docstring).

    PYTHONPATH=scripts/experiments/lagged_attention DS_SPD_LAG=1 \
        python scripts/experiments/lagged_attention/compare.py \
        --base runs/kl_scan21/ck --lag runs/lag21/ck --text T --out F
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.dirname(HERE))


def main() -> None:
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from ds_spd.build import build_runner
    from ds_spd.config import resolve_spd_config
    from ds_spd.data import segments_for
    from ds_spd.run import resolve_run
    from entropy_check import _interval
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--base", required=True, help="checkpoint measured without the lag")
    ap.add_argument("--lag", required=True, help="checkpoint measured with the lag")
    ap.add_argument("--text", required=True)
    ap.add_argument("--segments", type=int, default=16)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    runners, cfg = {}, None
    models = (("tp", {"spd_blocks": []}), ("base", {"checkpoint": args.base}), ("lag", {"checkpoint": args.lag}))
    for name, kw in models:
        cfg = resolve_spd_config(None, model=args.model, tp_size=2, **kw)
        runners[name] = build_runner(resolve_run(cfg, virtual_tp=2))
    layers = runners["base"].hf_model.model.layers
    if not all(hasattr(layer, "lag") for layer in layers):
        raise SystemExit("the lag patch is not loaded (PYTHONPATH=scripts/experiments/lagged_attention DS_SPD_LAG=1)")
    for layer in layers:
        layer.lag = False
    data = cfg.data.model_copy(update={"text": [args.text], "split": "test", "max_samples": args.segments})
    ids = segments_for(data, runners["tp"].tokenizer)
    kl = {"base": [], "lag": []}
    with torch.no_grad():
        for seg in tqdm(ids.split(1), desc="windows"):
            lp = {n: F.log_softmax(r.hf_model(input_ids=seg).logits[:, :-1].float(), -1) for n, r in runners.items()}
            for n in kl:
                kl[n].append((lp["tp"].exp() * (lp["tp"] - lp[n])).sum(-1).mean().item())
    report = {"text": args.text, "segments": int(ids.shape[0]), "base": args.base, "lag": args.lag,
              "kl_to_tp": {n: _interval(v) for n, v in kl.items()},
              "lag_minus_base": _interval([a - b for a, b in zip(kl["lag"], kl["base"])])}
    print(json.dumps(report, indent=1))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
