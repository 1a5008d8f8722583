"""A compiled decode step on real TP ranks, against the eager one: HF's static cache, ``torch.compile`` of the
model's forward for one-token steps (the all-reduce traced: DeepSpeed's shm op is a torch op), greedy tokens
compared, ms per step paired over interleaved rounds. On a CUDA device ``--mode reduce-overhead`` captures the
step as CUDA graphs (gpt-fast's form; the static cache's tensors have fixed addresses); the JSON counts the graphs
inductor declined to capture (``cudagraph_skips``, 0 when the whole step was captured).

    torchrun --nproc_per_node 2 scripts/experiments/compiled_decode.py [--spd-blocks none] [--rounds 5]
    torchrun --nproc_per_node 1 scripts/experiments/compiled_decode.py --mode reduce-overhead   # one GPU
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def engine_and_prompt(ap: argparse.ArgumentParser):
    """The flags every decode experiment takes, parsed; this rank's TP engine model, its rank and a 16-token prompt."""
    ap.add_argument("--model", default="default")
    ap.add_argument("--spd-blocks", default="none")
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    import torch

    from ds_spd.build import build_runner
    from ds_spd.config import parse_block_list, resolve_spd_config
    from ds_spd.run import resolve_run
    blocks = [] if args.spd_blocks == "none" else parse_block_list(args.spd_blocks)
    cfg = resolve_spd_config(None, model=args.model, tp_size=int(os.environ.get("WORLD_SIZE", "1")),
                             spd_blocks=blocks)
    model = build_runner(resolve_run(cfg)).hf_model
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    return args, model, int(os.environ.get("RANK", "0")), prompt.to(model.device)


def serving_executor(model):
    """``serve``'s step executor over ``model`` (8 slots of 2,048 positions, compiling), each slot's first 16
    keys filled (their values do not matter for timing)."""
    import torch

    from ds_spd.serve.executor import StepExecutor
    ex = StepExecutor(model, torch.device("cpu"), 8, 2048, compiled=True)
    for slot in range(8):
        ex.forward(slot, [0], [[1] * 16])
    return ex


def timed_steps(ex, fn, rows: int, keys: int, steps: int):
    """ms per step over ``steps`` decode steps of ``rows`` rows at ``keys`` keys through ``fn`` (a compiled step;
    None: the eager one), both ranks starting and stopping together; and the last step's logits."""
    import time

    import torch
    import torch.distributed as dist
    ex.compiled = fn
    with torch.no_grad():
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            out = ex.forward(0, [keys - 1] * rows, [[1]] * rows) if fn is None else \
                ex.decode_compiled([keys - 1] * rows, [[1]] * rows)
        dist.barrier()
    return 1e3 * (time.perf_counter() - start) / steps, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mode", default="default", help="torch.compile mode")
    ap.add_argument("--out", default=None)
    args, model, rank, prompt = engine_and_prompt(ap)
    import torch
    import torch.distributed as dist
    from torch._dynamo.utils import counters
    from transformers import StaticCache
    n0, device = prompt.shape[1], model.device

    def sync() -> None:   # all ranks, and this rank's device, done
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    def forward(ids, pos, cache):
        return model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    compiled = torch.compile(forward, mode=args.mode, dynamic=False)

    @torch.no_grad()
    def decode(step_fn) -> tuple[list[int], float]:
        cache = StaticCache(config=model.config, max_cache_len=n0 + args.steps + 1)
        logits = forward(prompt, torch.arange(n0, device=device)[None], cache)
        tokens = [int(logits.argmax(-1))]
        sync()
        start = time.perf_counter()
        for i in range(args.steps):
            logits = step_fn(torch.tensor([[tokens[-1]]], device=device), torch.tensor([[n0 + i]], device=device),
                             cache)
            tokens.append(int(logits.argmax(-1)))
        sync()
        return tokens, (time.perf_counter() - start) / args.steps

    start = time.perf_counter()
    decode(compiled)   # compiles
    compile_s = time.perf_counter() - start
    eager_tokens, _ = decode(forward)
    compiled_tokens, _ = decode(compiled)
    eager, comp = [], []
    for r in range(args.rounds):
        for name in (("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")):
            _, t = decode(forward if name == "eager" else compiled)
            (eager if name == "eager" else comp).append(t)
    if rank == 0:
        ratios = [c / e for c, e in zip(comp, eager)]
        res = {"model": args.model, "spd_blocks": args.spd_blocks, "steps": args.steps, "mode": args.mode,
               "device": str(device), "world_size": dist.get_world_size(),
               "cudagraph_skips": counters["inductor"]["cudagraph_skips"], "compile_seconds": compile_s,
               "same_greedy_tokens": eager_tokens == compiled_tokens,
               "eager_ms": [1e3 * t for t in eager], "compiled_ms": [1e3 * t for t in comp],
               "compiled_over_eager_median": statistics.median(ratios), "ratios": ratios}
        print(json.dumps(res, indent=1))
        if args.out:
            json.dump(res, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
