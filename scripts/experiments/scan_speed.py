"""Scan time with cached block inputs vs the naive L + 1 full evaluations, on the same data.

    OMP_NUM_THREADS=2 python scripts/experiments/scan_speed.py --virtual-tp 2 --max-samples 16 --out runs/scan_speed.json
"""
import argparse
import json
import os

import ds_spd
from ds_spd.data import load_texts, token_segments
from ds_spd.models.loading import load_model
from ds_spd.stages.scan import scan


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="default")
    p.add_argument("--virtual-tp", type=int, default=2)
    p.add_argument("--max-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", default="runs/scan_speed.json")
    args = p.parse_args()
    model, tok = load_model(args.model)
    ds_spd.virtualize(model, args.virtual_tp)
    segments = token_segments(load_texts(None, "pydoc", "train"), tok, args.seq_len, args.max_samples, seed=0)
    runs = {}
    for name, cached in (("cached", True), ("naive", False)):
        r = scan(model, segments, args.batch_size, use_cache=cached)
        runs[name] = {"seconds": r.seconds, "forwards_equivalent": r.forwards_equivalent, "baseline": r.baseline,
                      "sensitivity": r.sensitivity}
    diff = max(abs(a - b) for a, b in zip(runs["cached"]["sensitivity"], runs["naive"]["sensitivity"]))
    result = {"args": vars(args), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), **runs,
              "speedup": runs["naive"]["seconds"] / runs["cached"]["seconds"], "max_sensitivity_diff": diff}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("speedup", "max_sensitivity_diff")}),
          {k: round(runs[k]["seconds"], 1) for k in runs})


if __name__ == "__main__":
    main()
