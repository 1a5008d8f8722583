"""Where a tensor-parallel decode step's time goes: torch.profiler on rank 0 over greedy decode steps at batch 1.

    torchrun --nproc_per_node 2 scripts/experiments/profile_decode.py [--spd-blocks none] [--steps 32]

Prints the ops by self CPU time per step and the op count per step (what per-op overhead multiplies). Rank 0's
profiler slows rank 0, so the other rank waits longer in its all-reduce: read rank 0's own ops, not the wait.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--spd-blocks", default="none")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    import torch
    from transformers import DynamicCache

    from ds_spd.build import build_runner
    from ds_spd.config import parse_block_list, resolve_spd_config
    from ds_spd.run import resolve_run
    blocks = [] if args.spd_blocks == "none" else parse_block_list(args.spd_blocks)
    cfg = resolve_spd_config(None, model=args.model, tp_size=int(os.environ.get("WORLD_SIZE", "1")),
                             spd_blocks=blocks)
    runner = build_runner(resolve_run(cfg))
    model, rank = runner.hf_model, int(os.environ.get("RANK", "0"))
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def decode(steps: int) -> None:
        cache = DynamicCache()
        out = model(input_ids=prompt, cache=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(input_ids=nxt, cache=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)

    decode(4)   # warm-up
    if rank != 0:
        decode(args.steps)
        return
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode(args.steps)
    events = prof.key_averages()
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    print(f"aten ops per decode step (top level and nested): {ops / (args.steps + 1):.0f}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
