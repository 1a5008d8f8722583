"""Where the compiled one-row decode step's time goes besides reading weights, and what the cheap levers on the
rest measure (paired, interleaved rounds on real TP ranks):

- a kernel-level profile of the step as ``serve`` compiles it (inductor's kernel profile on): ms per step of its
  largest entries (fused kernels, attention, dynamo's guard evaluation, the all-reduce);
- ``tags``: dynamo's recursive dict-tag guards for nn modules (``use_recursive_dict_tags_for_guards``);
- ``skip``: ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)`` after the warm-up (only the guards that
  tell the cached graphs apart run);
- ``lean``: inductor's generated wrapper without its size, alignment and scalar asserts (``size_asserts``,
  ``alignment_asserts``, ``scalar_asserts`` off; docs/latency.md counts ~430 of them a step);
- attention on its own: the packed SDPA call against a multiply-and-sum form inductor generates whole
  (rank 0, one thread, compiled with dynamic shapes), per call.

    torchrun --nproc_per_node 2 scripts/experiments/step_overheads.py [--rounds 6] [--steps 32] [--out F]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from compiled_decode import engine_and_prompt, serving_executor, timed_steps

SHAPES = ((1, 300), (8, 300))


def profile_step(run, steps: int, top: int = 16) -> list[dict]:
    """The ``top`` entries of a profile of ``steps`` steps by self time (rank 0's view): name (an inductor
    kernel's name lists the ops it fused), ms and calls per step."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(steps)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows)
    return [{"name": e.key[:160], "ms_per_step": e.self_cpu_time_total / 1e3 / steps,
             "calls_per_step": e.count / steps} for e in rows[:top]] + [{"name": "all", "ms_per_step": total / 1e3 / steps}]


def attention_forms(rounds: int) -> dict[str, dict[str, float]]:
    """µs per compiled call: packed SDPA and a multiply-and-sum form, SmolLM2's rank-0 shapes (6 query heads on
    2 KV heads of 64), best of ``rounds`` x 200 calls."""
    import torch
    import torch.nn.functional as F

    def sdpa(q, k, v, m):
        b, h, _, d = q.shape
        g = h // k.shape[1]
        return F.scaled_dot_product_attention(q.reshape(b, h // g, g, d), k, v, attn_mask=m, scale=0.125)

    def mulsum(q, k, v, m):
        b, h, _, d = q.shape
        kv = k.shape[1]
        s = (q.reshape(b, kv, h // kv, 1, d) * k[:, :, None]).sum(-1) * 0.125 + m[:, :, None, 0]
        return (s.softmax(-1)[..., None] * v[:, :, None]).sum(-2)
    out = {}
    for rows, keys in ((1, 300), (1, 1200), (8, 300), (8, 1200)):
        q, k, v = torch.randn(rows, 6, 1, 64), torch.randn(rows, 2, keys, 64), torch.randn(rows, 2, keys, 64)
        m = torch.zeros(rows, 1, 1, keys)
        res = {}
        for name, fn in (("sdpa", sdpa), ("mulsum", mulsum)):
            c = torch.compile(fn, dynamic=True)
            for _ in range(50):
                c(q, k, v, m)
            best = float("inf")
            for _ in range(rounds):
                t = time.perf_counter()
                for _ in range(200):
                    c(q, k, v, m)
                best = min(best, (time.perf_counter() - t) / 200)
            res[f"{name}_us"] = 1e6 * best
        out[f"{rows}x{keys}"] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", default=None)
    args, model, rank, _ = engine_and_prompt(ap)
    import torch
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config
    import torch.distributed as dist

    from ds_spd.serve.compile import compile_decode
    ex = serving_executor(model)
    inductor_config.cpp.enable_kernel_profile = True   # kernels named in the profile (a no-op unless profiling)
    base = compile_decode(ex._decode, model)
    ex.compiled = base
    ex.warm_up()
    dynamo_config.use_recursive_dict_tags_for_guards = True   # read when a graph's guards are built

    def same_step(*a):   # another code object: its own cache entries, built with the setting above
        return ex._decode(*a)
    tagged = compile_decode(same_step, model)
    ex.compiled = tagged
    ex.warm_up()
    dynamo_config.use_recursive_dict_tags_for_guards = False
    inductor_config.size_asserts = inductor_config.alignment_asserts = inductor_config.scalar_asserts = False

    def lean_step(*a):   # compiled with the wrapper's asserts off (part of inductor's cache key)
        return ex._decode(*a)
    lean = compile_decode(lean_step, model)
    ex.compiled = lean
    ex.warm_up()
    variants = {"base": (base, False), "tags": (tagged, False), "skip": (base, True), "lean": (lean, False)}

    def run(fn, skip: bool, rows: int, keys: int, n: int):
        with torch.compiler.set_stance(skip_guard_eval_unsafe=skip):
            return timed_steps(ex, fn, rows, keys, n)

    res = {"steps": args.steps, "rounds": args.rounds, "shapes": {}}
    with torch.no_grad():
        for rows, keys in SHAPES:
            outs = {name: run(*v, rows, keys, 2)[1] for name, v in variants.items()}
            times = {name: [] for name in variants}
            for r in range(args.rounds):
                for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                    times[name].append(run(*variants[name], rows, keys, args.steps)[0])
            res["shapes"][f"{rows}x{keys}"] = {
                "same_logits": all(torch.equal(outs["base"], o) for o in outs.values()),
                **{f"{n}_ms": t for n, t in times.items()},
                **{f"{n}_over_base": statistics.median(a / b for a, b in zip(t, times["base"]))
                   for n, t in times.items() if n != "base"}}
        res["profile_1x300_ms"] = profile_step(lambda n: run(base, False, 1, 300, n), args.steps)
    dist.barrier()
    inductor_config.size_asserts = inductor_config.alignment_asserts = inductor_config.scalar_asserts = True
    if rank == 0:   # the attention forms compile as serve does: with inductor's asserts
        res["attention_forms"] = attention_forms(args.rounds)
        print(json.dumps(res, indent=1))
        if args.out:
            json.dump(res, open(args.out, "w"), indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
