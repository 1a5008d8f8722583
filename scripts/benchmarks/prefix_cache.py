"""Prefix caching, measured: what it saves where prompts repeat, and that it costs nothing where they do not.

Three workloads against ``ds-spd serve`` (tp 2 on CPU ranks, the default model, every other setting its default):

- chats: ~500-token system prompt and a short user message, 8 new tokens, streamed through the ``openai``
  client; each round sends 8 chats that share one system prompt and 8 whose system prompts are all different
  (the same length, never seen before), at 1 and at 4 concurrent streams, the two kinds in a shuffled order;
  time to first token (TTFT) p50 of each, paired by round;
- lm-evaluation-harness's ``local-completions`` on ``ds_spd_next_text`` (configs/lm_eval: 240 questions, four
  continuations each, every choice sent with its passage): a server with the cache and one started with
  ``--no-prefix-cache``, the questions in 4 blocks of 60, each block run on both in a shuffled order; wall time
  per block paired, and every choice's log-likelihood and the accuracy compared;
- long prompts (384-512 tokens of Shakespeare, none sharing a start), 48 tokens out, arriving at 1 per second:
  the same two servers, 3 repeats in a shuffled order; TTFT, TPOT and output throughput paired.

Run on an otherwise idle machine (pause background work: the figures are ratios of wall times):

    python scripts/benchmarks/prefix_cache.py --out docs/results/prefix_cache
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from ds_spd.tools.bench import paired_ratio  # noqa: E402

TASK = "ds_spd_next_text"


def texts(tokenizer, n: int, tokens: int, seed: int) -> list[str]:
    """``n`` distinct passages of ``tokens`` tokens from Shakespeare's test split (system prompts)."""
    from ds_spd.data import load_texts, token_segments
    windows = token_segments(load_texts(None, "shakespeare", "test"), tokenizer, tokens, n, seed)
    return [tokenizer.decode(w) for w in windows]


async def chat_ttft(url: str, model: str, system: str, user: str) -> tuple[float, int]:
    """One streamed chat: seconds to its first content, and the prompt tokens the server reused."""
    from openai import AsyncOpenAI
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    start, first, cached = time.perf_counter(), None, None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
        max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            cached = chunk.usage.prompt_tokens_details.cached_tokens
    await client.close()
    return first, cached


async def chats(url: str, model: str, pairs: list[tuple[str, str]], concurrency: int) -> list[tuple[float, int]]:
    limit = asyncio.Semaphore(concurrency)

    async def one(system, user):
        async with limit:
            return await chat_ttft(url, model, system, user)
    return await asyncio.gather(*(one(s, u) for s, u in pairs))


def bench_chats(srv, model: str, tokenizer, rounds: int, per_kind: int, system_tokens: int) -> dict:
    from tqdm.auto import tqdm
    levels = (1, 4)
    pool = texts(tokenizer, 2 + rounds * len(levels) * per_kind, system_tokens, seed=7)
    users = [f"Question {i}: what does the passage above say about {w}?"
             for i, w in enumerate(["love", "death", "the king", "war", "time", "night", "gold", "the sea"] * 64)]
    shared, warm, fresh = pool[0], pool[1], iter(pool[2:])
    asyncio.run(chats(srv.url, model, [(shared, users[-1]), (warm, users[-2])], 1))   # warm-up (and the app's
    rng, runs, k = random.Random(0), [], 0                                               # prompt, cached once)
    bar = tqdm(total=rounds * len(levels) * 2, desc="chats")
    for rnd in range(rounds):
        for conc in levels:
            kinds = ["shared", "distinct"]
            rng.shuffle(kinds)
            for kind in kinds:
                pairs = [(shared if kind == "shared" else next(fresh), users[k + i]) for i in range(per_kind)]
                k += per_kind
                out = asyncio.run(chats(srv.url, model, pairs, conc))
                runs.append({"round": rnd, "concurrency": conc, "kind": kind, "ttft_s": [t for t, _ in out],
                             "cached_tokens": [c for _, c in out]})
                bar.update()
    bar.close()
    table = []
    for conc in levels:
        p50 = {kind: [statistics.median(r["ttft_s"]) for r in runs if r["concurrency"] == conc and r["kind"] == kind]
               for kind in ("shared", "distinct")}
        table.append({"concurrency": conc, "ttft_p50_ms": {k: 1e3 * statistics.median(v) for k, v in p50.items()},
                      "distinct_over_shared": paired_ratio(p50["distinct"], p50["shared"]),
                      "cached_tokens_median": {kind: statistics.median(c for r in runs if r["concurrency"] == conc
                                                                      and r["kind"] == kind
                                                                      for c in r["cached_tokens"])
                                               for kind in ("shared", "distinct")}})
    return {"system_tokens": system_tokens, "chats_per_kind": per_kind, "rounds": rounds, "runs": runs,
            "table": table}


def lm_eval_block(srv, model: str, tokenizer_path: str, docs: list[int]) -> tuple[float, dict]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    tasks = TaskManager(include_path=os.path.join(ROOT, "configs/lm_eval"))
    start = time.perf_counter()
    out = simple_evaluate(model="local-completions", tasks=[TASK], task_manager=tasks, samples={TASK: docs},
                          model_args={"base_url": f"{srv.url}/v1/completions", "model": model,
                                      "tokenizer": tokenizer_path, "tokenizer_backend": "huggingface",
                                      "num_concurrent": 1, "max_retries": 1}, log_samples=True)
    seconds = time.perf_counter() - start
    return seconds, {r["doc_id"]: ([x[0][0] for x in r["resps"]], r["target"]) for r in out["samples"][TASK]}


def bench_lm_eval(servers: dict, model: str, tokenizer_path: str, blocks: int, questions: int) -> dict:
    rng, runs = random.Random(1), []
    lls: dict[str, dict] = {name: {} for name in servers}
    size = questions // blocks
    for b in range(blocks):
        docs = list(range(b * size, (b + 1) * size))
        names = list(servers)
        rng.shuffle(names)
        for name in names:
            seconds, got = lm_eval_block(servers[name], model, tokenizer_path, docs)
            lls[name].update(got)
            runs.append({"block": b, "server": name, "seconds": seconds})
            print(f"lm_eval block {b} on {name}: {seconds:.1f} s", flush=True)
    secs = {name: [r["seconds"] for r in runs if r["server"] == name] for name in servers}
    diffs = [abs(a - b) for d in lls["cache"] for a, b in zip(lls["cache"][d][0], lls["no_cache"][d][0])]

    def acc(name):
        return statistics.mean(max(range(len(v[0])), key=v[0].__getitem__) == int(v[1]) for v in lls[name].values())
    return {"questions": len(lls["cache"]), "blocks": blocks, "runs": runs,
            "seconds": {k: sum(v) for k, v in secs.items()},
            "no_cache_over_cache": paired_ratio(secs["no_cache"], secs["cache"]),
            "accuracy": {name: acc(name) for name in servers}, "max_abs_ll_difference": max(diffs),
            "choices_compared": len(diffs)}


def bench_long_prompts(servers: dict, model: str, tokenizer, repeats: int, n: int) -> dict:
    from ds_spd.tools import bench_serve as bs
    works = bs.make_workload(tokenizer, n, (384, 512), 48, seed=11, dataset="shakespeare", count=repeats)
    rng, runs = random.Random(2), []
    for rep in range(repeats):
        names = list(servers)
        rng.shuffle(names)
        for name in names:
            summary = asyncio.run(bs.run_load(servers[name].url, model, works[rep], 1.0, None, rep))
            runs.append({"repeat": rep, "server": name, **summary})
            print(f"long prompts #{rep} on {name}: TTFT p50 {summary['ttft']['p50_ms']:.0f} ms", flush=True)

    def col(name, metric, key="p50_ms"):
        return [r[metric][key] if key else r[metric] for r in runs if r["server"] == name]
    return {"requests": n, "prompt_len": [384, 512], "output_len": 48, "rate": 1.0, "repeats": repeats, "runs": runs,
            "cache_over_no_cache": {m: paired_ratio(col("cache", m), col("no_cache", m)) for m in ("ttft", "tpot")} |
            {"output_throughput": paired_ratio(col("cache", "output_throughput", None),
                                               col("no_cache", "output_throughput", None))}}


def _ratio(r: dict) -> str:
    ci = r.get("ratio_ci95")
    return f"{r['ratio']:.2f}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def markdown(res: dict, command: str) -> str:
    lines = ["# Prefix caching", "", f"`{command}` (on {res['machine']}; tp 2, the default model, default settings; "
             "paired ratios: median, 95% interval of the geometric mean).", ""]
    if "chats" in res:
        c = res["chats"]
        lines += [f"## Chats: a {c['system_tokens']}-token system prompt shared, or distinct ({c['chats_per_kind']} "
                  f"chats per kind and round, {c['rounds']} rounds)", "",
                  "| streams | TTFT p50 shared | TTFT p50 distinct | distinct / shared | reused tokens (shared / "
                  "distinct, median) |", "|---|---|---|---|---|"]
        for row in c["table"]:
            t, r = row["ttft_p50_ms"], row["cached_tokens_median"]
            lines.append(f"| {row['concurrency']} | {t['shared']:.0f} ms | {t['distinct']:.0f} ms | "
                         f"{_ratio(row['distinct_over_shared'])} | {r['shared']:.0f} / {r['distinct']:.0f} |")
        lines.append("")
    if "lm_eval" in res:
        e = res["lm_eval"]
        lines += [f"## lm_eval local-completions, {TASK} ({e['questions']} questions, {e['blocks']} blocks)", "",
                  f"- wall time: {e['seconds']['cache']:.0f} s with the cache, {e['seconds']['no_cache']:.0f} s "
                  f"without; without / with, per block: {_ratio(e['no_cache_over_cache'])}",
                  f"- accuracy: {e['accuracy']['cache']:.4f} with, {e['accuracy']['no_cache']:.4f} without; "
                  f"largest difference of a choice's log-likelihood: {e['max_abs_ll_difference']:.2e} "
                  f"({e['choices_compared']} choices)", ""]
    if "long_prompts" in res:
        lp = res["long_prompts"]
        r = lp["cache_over_no_cache"]
        lines += [f"## Long prompts, none shared ({lp['requests']} requests of {lp['prompt_len'][0]}-"
                  f"{lp['prompt_len'][1]} tokens, {lp['output_len']} out, {lp['rate']:g}/s, {lp['repeats']} repeats)",
                  "", "| with / without the cache | TTFT p50 | TPOT p50 | output tokens/s |", "|---|---|---|---|",
                  f"| ratio | {_ratio(r['ttft'])} | {_ratio(r['tpot'])} | {_ratio(r['output_throughput'])} |", ""]
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = res["chats"]["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, conc in zip(axes, (1, 4)):
        data = [[1e3 * t for r in runs if r["concurrency"] == conc and r["kind"] == kind for t in r["ttft_s"]]
                for kind in ("shared", "distinct")]
        ax.boxplot(data, tick_labels=["shared system prompt", "distinct"])
        ax.set_title(f"{conc} stream{'s' if conc > 1 else ''}")
        ax.set_yscale("log")
    axes[0].set_ylabel("time to first token (ms)")
    fig.suptitle(f"ds-spd serve, tp 2: {res['chats']['system_tokens']}-token system prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="default")
    ap.add_argument("--parts", default="chats,lm_eval,long_prompts")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--questions", type=int, default=240, help="of the task's 240 (fewer: a quick try)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from ds_spd.models.loading import load_tokenizer
    from ds_spd.tools.serve_process import ServerProcess
    os.makedirs(args.out, exist_ok=True)
    parts = args.parts.split(",")
    tok = load_tokenizer(args.model)
    import platform
    res = {"machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}", "parts": parts}
    base = ["--model", args.model, "--served-model-name", "m"]
    servers = {"cache": ServerProcess(base)}
    try:
        if "chats" in parts:
            res["chats"] = bench_chats(servers["cache"], "m", tok, args.rounds, 8, 500)
        if "lm_eval" in parts or "long_prompts" in parts:
            servers["no_cache"] = ServerProcess([*base, "--no-prefix-cache"])
            asyncio.run(chats(servers["no_cache"].url, "m", [("Warm up.", "Hello")], 1))   # first-touch costs
        if "lm_eval" in parts:
            res["lm_eval"] = bench_lm_eval(servers, "m", tok.name_or_path, args.blocks, args.questions)
        if "long_prompts" in parts:
            res["long_prompts"] = bench_long_prompts(servers, "m", tok, args.repeats, 16)
    finally:
        for srv in servers.values():
            srv.interrupt()
    command = "python scripts/benchmarks/prefix_cache.py " + " ".join(sys.argv[1:])
    with open(os.path.join(args.out, "prefix_cache.json"), "w") as f:
        json.dump({**res, "command": command}, f, indent=1)
    with open(os.path.join(args.out, "prefix_cache.md"), "w") as f:
        f.write(markdown(res, command))
    if "chats" in res:
        plot(res, os.path.join(args.out, "prefix_cache.png"))
    print(markdown(res, command))


if __name__ == "__main__":
    main()
