"""The serving decode step on real TP ranks at several (rows, context) shapes, paired over interleaved rounds:
eager; ``kernel``, what ``serve`` runs by default (ds_spd.serve.compile: dynamic shapes, one-row products as
inductor's own multiply-and-sums, several-row products through ds_spd's C++ kernel); ``gemv``, the same with the
several-row products left to the library (MKL); ``onekernel``, ``kernel`` with the one-row products through
ds_spd's kernel too; ``onegemv``, ``kernel`` with the one-row products left to the library; ``rows``, the
several-rows graph's products as multiply-and-sums (an experiment's variant); ``dynamic``, no product rewritten
(two graphs for every shape); ``aot``, ``kernel``'s graphs compiled ahead of time and called with only their
inputs' guards checked (ds_spd.serve.compile.AheadOfTimeDecode); ``spd``, ``kernel`` with every block in SPD form
(the same compiled function: its own graphs, the SPD-vs-TP pair of the lean step); ``frozen``, the same with
inductor's freezing (weights folded into the graph as constants, prepacked for its GEMMs); ``static``, compiled
for each shape alone (a graph per shape: what dynamic shapes may cost). ms per step, compile seconds. Each rank's
weight bytes (what a one-row step reads: every parameter but the embedding table) over its step time, against the
bandwidth one core reads in the same round, both ranks at once (``torch.sum`` over 512 MB; ``F.linear`` of one row
over 1 GB of distinct matrices; the faster of the two): the fraction of the memory limit, paired by round (median
and range). The variant compiled later in a run has measured faster in every run so far: pair two runs in both
orders.

    torchrun --nproc_per_node 2 scripts/experiments/decode_shapes.py [--spd-blocks none] [--rounds 5] \
        [--variants eager,kernel,onekernel,onegemv,gemv,rows,aot,spd,dynamic,frozen,static] [--out F]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from compiled_decode import engine_and_prompt, serving_executor, timed_steps

SHAPES = ((1, 300), (1, 1200), (8, 300), (8, 1200))
#: the variants that rewrite the graphs' products: (several_rows, one_row) of ds_spd.serve.compile.RowProducts
PRODUCTS = {"kernel": ("kernel", "reductions"), "rows": ("reductions", "reductions"), "gemv": ("library", "reductions"),
            "onekernel": ("kernel", "kernel"), "onegemv": ("kernel", "library")}


def one_core_bandwidth(dist) -> dict[str, float]:
    """GB/s this rank reads while every rank reads (best of 5): a reduction, and one-row matrix products."""
    import torch
    import torch.nn.functional as F
    out = {}
    x = torch.ones(2**27)                                   # 512 MB
    mats = [torch.ones(4096, 4096) for _ in range(16)]      # 1 GB, distinct matrices (no cache reuse)
    row = torch.ones(1, 4096)
    for name, fn, nbytes in (("sum", lambda: x.sum(), x.numel() * 4),
                             ("linear", lambda: [F.linear(row, m) for m in mats], 16 * 4096 * 4096 * 4)):
        best = float("inf")
        for _ in range(5):
            dist.barrier()
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        out[name] = nbytes / best / 1e9
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", default="eager,gemv,dynamic")
    ap.add_argument("--out", default=None)
    args, model, rank, _ = engine_and_prompt(ap)
    import torch
    import torch.distributed as dist

    from ds_spd.serve.compile import compile_decode
    ex = serving_executor(model)
    variants = args.variants.split(",")
    fns, compile_s = {"eager": None}, {}
    start = time.perf_counter()

    from ds_spd.core.inject import get_spd_blocks, set_spd_blocks, spd_layers
    plain = get_spd_blocks(model)

    def spd_form(name: str) -> None:   # ``spd``: every block in SPD form; the others: the run's own blocks
        set_spd_blocks(model, range(len(spd_layers(model))) if name == "spd" else plain)

    def step(fn, rows: int, keys: int) -> float:
        return timed_steps(ex, fn, rows, keys, args.steps)[0]

    for name in variants:
        t = time.perf_counter()
        spd_form(name)
        if name == "spd":   # kernel's function, compiled again for the SPD form (a guard on each block's form)
            ex.compiled = fns[name] = fns.get("kernel") or compile_decode(ex._decode, model)
            ex.warm_up()
        elif name == "aot":   # kernel's graphs compiled ahead of time, only their inputs' guards checked
            ex.compiled = fns[name] = compile_decode(ex._decode, model, ahead_of_time=True)
            ex.warm_up()
        elif name in (*PRODUCTS, "dynamic", "frozen"):
            # options: another backend, so not the other variant's cached graphs (dynamo caches by code object)
            several, one = PRODUCTS.get(name, (None, None))
            ex.compiled = fns[name] = compile_decode(ex._decode, model, several_rows=several, one_row=one) \
                if several else torch.compile(ex._decode, dynamic=True, options={"freezing": name == "frozen"})
            ex.warm_up()
        elif name == "static":
            fns[name] = {shape: torch.compile(ex._decode, dynamic=False) for shape in SHAPES}
            for shape in SHAPES:
                step(fns[name][shape], *shape)
        compile_s[name] = time.perf_counter() - t
    res = {"model": args.model, "spd_blocks": args.spd_blocks, "steps": args.steps, "compile_seconds": compile_s,
           "shapes": {}}
    bws = {}   # this rank's bandwidth probe in every one-row round, beside the steps: the rate drifts between runs
    for rows, keys in SHAPES:
        shape, times = f"{rows}x{keys}", {name: [] for name in variants}
        for r in range(args.rounds):
            if rows == 1:
                bws.setdefault(shape, []).append(one_core_bandwidth(dist))
            for name in (variants if r % 2 == 0 else variants[::-1]):
                fn = fns[name][(rows, keys)] if name == "static" else fns[name]
                spd_form(name)
                times[name].append(step(fn, rows, keys))
            spd_form("")
        res["shapes"][shape] = {
            **{f"{k}_ms": v for k, v in times.items()},
            **{f"{k}_over_eager": statistics.median(a / e for a, e in zip(v, times["eager"]))
               for k, v in times.items() if k != "eager"}}
        if "spd" in times and "kernel" in times:   # SPD over TP with the lean step, paired by round
            pair = sorted(a / b for a, b in zip(times["spd"], times["kernel"]))
            res["shapes"][shape]["spd_over_tp"] = {"median": statistics.median(pair), "range": [pair[0], pair[-1]]}
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, {"weight_bytes": weight_bytes, "one_core_gbs": bws})
    for r in ranks:   # a one-row step reads the rank's weights once: GB/s, and its fraction of one core's reads
        r["steps"] = {}
        for shape, probes in r["one_core_gbs"].items():
            for name in variants:
                rates = [r["weight_bytes"] / 1e6 / ms for ms in res["shapes"][shape][f"{name}_ms"]]
                fractions = sorted(g / max(p.values()) for g, p in zip(rates, probes))
                r["steps"][f"{name} {shape}"] = {"gbs": statistics.median(rates),
                                                 "of_limit": statistics.median(fractions),
                                                 "of_limit_range": [fractions[0], fractions[-1]]}
    res["ranks"] = ranks
    res["seconds"] = time.perf_counter() - start
    if rank == 0:
        print(json.dumps(res, indent=1))
        if args.out:
            json.dump(res, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
