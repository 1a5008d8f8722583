"""What lagged attention costs a decode step on real TP ranks: the same distilled checkpoint's blocks in SPD form
with and without the lag (its one sync then carries [Y_r + Z_r, Y_r], twice the payload, and one state vector a
block is read and written), and plain TP, timed in rotating order in one process per rank.

    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 scripts/benchmarks/lag_decode_cost.py \
        --checkpoint runs/lag21/ck --out docs/results/lag_decode_cost

One stream (batch 1) after a 64-token prompt, 32 decode steps a sample, eager; paired ratios over repeats
(ds_spd.tools.bench.paired_ratio: median and a 95% t-interval of the geometric mean). Nothing else may run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> None:
    import torch
    from tqdm import tqdm

    from ds_spd.build import build_runner
    from ds_spd.config import resolve_spd_config
    from ds_spd.core.inject import set_lag, set_spd_blocks
    from ds_spd.ranks import is_main_rank
    from ds_spd.run import resolve_run
    from ds_spd.tools.bench import _stats, paired_ratio, time_decode
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--model", default="default")
    ap.add_argument("--checkpoint", required=True, help="a checkpoint distilled with --lag")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = resolve_spd_config(None, model=args.model, checkpoint=args.checkpoint, tp_size=int(os.environ["WORLD_SIZE"]))
    spec = resolve_run(cfg)
    if not spec.lag:
        raise SystemExit(f"{args.checkpoint}: not distilled with lagged attention (its plan says lag: false)")
    runner = build_runner(spec)
    model = runner.hf_model
    blocks = spec.spd_blocks
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    modes = {"tp": ((), False), "spd": (blocks, False), "lag": (blocks, True)}
    samples = {m: [] for m in modes}
    syncs = {}
    for rep in tqdm(range(args.warmup + args.repeats), desc="lag decode cost", disable=not is_main_rank()):
        order = list(modes)
        random.Random(rep).shuffle(order)   # the same order on every rank
        for m in order:
            spd, lag = modes[m]
            set_spd_blocks(model, spd)
            set_lag(model, lag)
            seconds = time_decode(model, prompt, args.steps, runner.stats.reset)
            if rep >= args.warmup:
                samples[m].append(seconds)
                syncs[m] = runner.stats.summary()["allreduce_by_kind_per_forward"]
    result = {"checkpoint": args.checkpoint, "spd_blocks": list(blocks), "ranks": int(os.environ["WORLD_SIZE"]),
              "prompt": args.prompt, "steps": args.steps, "repeats": args.repeats,
              "step": {m: _stats(v) for m, v in samples.items()}, "syncs_per_step": syncs,
              "lag_over_spd": paired_ratio(samples["lag"], samples["spd"]),
              "lag_over_tp": paired_ratio(samples["lag"], samples["tp"]),
              "spd_over_tp": paired_ratio(samples["spd"], samples["tp"])}
    if is_main_rank():
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "lag_decode_cost.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps({k: result[k] for k in ("step", "lag_over_spd", "lag_over_tp", "spd_over_tp")}, indent=1))


if __name__ == "__main__":
    main()
