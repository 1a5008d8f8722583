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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    from compiled_decode import engine_and_prompt
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=30)
    args, model, rank, prompt = engine_and_prompt(ap)
    import torch
    from transformers import DynamicCache

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
