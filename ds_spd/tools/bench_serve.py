"""``ds-spd bench-serve``: the serving benchmark, modelled on vLLM's (``vllm bench serve``).

Requests with prompts cut from a shipped corpus (token-id prompts of random lengths) arrive as a Poisson
process at each request rate (``inf``: all at once), optionally under a concurrency cap; every request
streams, so time to first token (TTFT) and inter-token latency (ITL) are measured at the client.
Reported per load: completed / failed, request and output-token throughput, TTFT, TPOT = (latency - TTFT) /
(output tokens - 1), ITL and end-to-end latency, each mean / p50 / p90 / p99.

Against one running server (``--url``), any OpenAI-compatible one: a probe request finds what it accepts
(:class:`Backend`: token-id prompts, vLLM's ``ignore_eos``, ``stream_options``); a server that takes none of them
(``transformers serve``) gets text prompts, and the output tokens counted are the ones it returned (its
``usage``, else one per streamed text chunk); engine metrics are read from ``/metrics`` where it has ds_spd's.
Or side by side: the benchmark starts one server per engine (TP, the
plan's SPD blocks, every block SPD) on each all-reduce path (``shm``, ``gloo``, ``2hosts``: two simulated hosts)
and runs every load on each engine in a shuffled order, repeat after repeat; each SPD engine's median TPOT,
TTFT and latency are paired with TP's of the same repeat and reported as ratios with 95% intervals (as ``bench``
does). Outputs: bench_serve.json, bench_serve.md, bench_serve.png.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field

OUTPUT_FILES = ("bench_serve.json", "bench_serve.md", "bench_serve.png")
PATHS = {"shm": dict(hosts=1, comm="auto"), "gloo": dict(hosts=1, comm="gloo"), "2hosts": dict(hosts=2, comm="auto")}


@dataclass
class Record:
    ok: bool
    prompt_tokens: int
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.ok and self.output_tokens > 1 else None


def make_workload(tokenizer, n: int, prompt_len: tuple[int, int], output_len: int, seed: int,
                  dataset: str = "pydoc", count: int = 1) -> list[list[tuple[list[int], int]]]:
    """``count`` workloads of ``n`` (prompt token ids, max_tokens) each: prompts of uniform random length cut from
    distinct windows of the corpus's test split, so no prompt repeats another's start (a server with a prefix
    cache would answer a repeat from it: one workload per repeat and load)."""
    from ds_spd.data import load_texts, token_segments
    rng = random.Random(seed)
    windows = token_segments(load_texts(None, dataset, "test"), tokenizer, prompt_len[1], n * count, seed)
    if windows.shape[0] < n * count:
        from ds_spd.errors import DataError
        raise DataError(f"the {dataset} test split has only {windows.shape[0]} prompts of {prompt_len[1]} tokens, "
                        f"{n * count} needed ({n} requests x {count} loads and repeats, none repeated): ask for "
                        "fewer, shorter prompts, or --corpus shakespeare (20x the text)")
    prompts = [(w[:rng.randint(*prompt_len)].tolist(), output_len) for w in windows]
    return [prompts[i * n:(i + 1) * n] for i in range(count)]


@dataclass(frozen=True)
class Backend:
    """What a server accepts beyond OpenAI's core completion fields (ds_spd and vLLM: all of it)."""

    token_ids: bool = True      # prompts as token ids (else text)
    ignore_eos: bool = True     # vLLM's extension: every request generates max_tokens
    usage: bool = True          # stream_options.include_usage: the server counts the tokens

    def body(self, model: str, prompt: list[int], max_tokens: int, tokenizer=None) -> dict:
        body = {"model": model, "prompt": prompt if self.token_ids else tokenizer.decode(prompt),
                "max_tokens": max_tokens, "temperature": 0, "stream": True}
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.usage:
            body["stream_options"] = {"include_usage": True}
        return body


#: tried in order by :func:`probe_backend`: the first the server answers with 200 is used
BACKENDS = (Backend(), Backend(token_ids=False), Backend(token_ids=False, ignore_eos=False),
            Backend(token_ids=False, ignore_eos=False, usage=False))
#: ``bench-serve --backend``: ``auto`` probes; ``openai`` (OpenAI's own fields: text prompts, the server's own
#: end-of-sequence) gives different servers the same requests
NAMED_BACKENDS = {"full": BACKENDS[0], "openai": BACKENDS[2]}


def probe_backend(url: str, model: str, tokenizer, headers: dict | None = None) -> Backend:
    """The first of :data:`BACKENDS` a server answers a 2-token request of with 200 (a 422 or 400 for an unknown
    field or a token-id prompt moves on to the next); a server that refuses all of them is an error."""
    import urllib.error
    import urllib.request
    answers = []
    for backend in BACKENDS:
        data = json.dumps(backend.body(model, tokenizer("Hello").input_ids, 2, tokenizer)).encode()
        req = urllib.request.Request(f"{url}/v1/completions", data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                r.read()
                return backend
        except urllib.error.HTTPError as err:
            answers.append(f"{err.code} {err.read()[:120]!r}")
    raise RuntimeError(f"{url} refused every request form: {'; '.join(answers)}")


async def _one(session, url: str, body: dict, prompt_tokens: int) -> Record:
    rec, start, last, chunks = Record(False, prompt_tokens), time.perf_counter(), None, 0
    try:
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return rec
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    rec.error = chunk["error"]["message"]
                    return rec
                now = time.perf_counter()
                if chunk.get("usage"):
                    rec.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk["choices"] or not chunk["choices"][0].get("text"):
                    continue
                chunks += 1
                if last is None:
                    rec.ttft = now - start
                else:
                    rec.itl.append(now - last)
                last = now
        rec.output_tokens = rec.output_tokens or chunks   # no usage: one token per text chunk
        rec.latency, rec.ok = time.perf_counter() - start, rec.output_tokens > 0
    except Exception as err:   # a failed request is a result, not a crash of the benchmark
        rec.error = f"{type(err).__name__}: {err}"
    return rec


def decode_forward_totals(url: str) -> tuple[float, float]:
    """(seconds, count) of the server's decode forwards so far, from its /metrics (0, 0 if it has none)."""
    import urllib.request
    seconds = count = 0.0
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith('ds_spd:model_forward_seconds_sum{kind="decode"}'):
                    seconds = float(line.rsplit(" ", 1)[1])
                elif line.startswith('ds_spd:model_forward_seconds_count{kind="decode"}'):
                    count = float(line.rsplit(" ", 1)[1])
    except OSError:
        pass
    return seconds, count


def bench_url_cli(url: str, args: list[str], out: str, cwd: str | None = None) -> list[dict]:
    """``ds-spd bench-serve --url URL ARGS --out OUT`` in a subprocess, as a user runs it; its runs (scripts that
    compare servers or commits)."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "ds_spd", "bench-serve", "--url", url, *args, "--out", out],
                          cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"bench-serve against {url} failed:\n{done.stderr[-3000:]}")
    with open(os.path.join(out, "bench_serve.json")) as f:
        return json.load(f)["runs"]


def auth_headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def run_load(url: str, model: str, workload, rate: float, concurrency: int | None, seed: int,
                   api_key: str | None = None, backend: Backend = Backend(), tokenizer=None) -> dict:
    """Send the workload (Poisson arrivals at ``rate`` per second, at most ``concurrency`` at once); summarise."""
    import aiohttp
    rng = random.Random(seed)
    limit = asyncio.Semaphore(concurrency or len(workload))
    timeout = aiohttp.ClientTimeout(total=3600)

    async def gated(session, prompt, max_tokens):
        async with limit:
            return await _one(session, url, backend.body(model, prompt, max_tokens, tokenizer), len(prompt))
    fwd_before = decode_forward_totals(url)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0),
                                     headers=auth_headers(api_key)) as session:
        tasks, start = [], time.perf_counter()
        for prompt, max_tokens in workload:
            tasks.append(asyncio.create_task(gated(session, prompt, max_tokens)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    fwd_after = decode_forward_totals(url)
    n = fwd_after[1] - fwd_before[1]
    # the engine's own decode forward time in this load: TPOT over it is what the server adds per token
    forward_ms = 1e3 * (fwd_after[0] - fwd_before[0]) / n if n else None
    return {**summarize(records, duration), "decode_forward_ms": forward_ms}


def _dist(xs: list[float]) -> dict:
    if not xs:
        return {}
    s = sorted(xs)
    pick = lambda q: s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]  # noqa: E731
    return {"mean_ms": 1e3 * statistics.fmean(s), "p50_ms": 1e3 * statistics.median(s), "p90_ms": 1e3 * pick(0.9),
            "p99_ms": 1e3 * pick(0.99)}


def summarize(records: list[Record], duration: float) -> dict:
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    return {"completed": len(ok), "failed": len(records) - len(ok), "duration_s": duration,
            "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
            "total_output_tokens": out_tokens, "total_prompt_tokens": sum(r.prompt_tokens for r in ok),
            "ttft": _dist([r.ttft for r in ok]), "tpot": _dist([r.tpot for r in ok if r.tpot is not None]),
            "itl": _dist([x for r in ok for x in r.itl]), "e2el": _dist([r.latency for r in ok]),
            "errors": sorted({r.error for r in records if not r.ok})[:5]}


# ---------------------------------------------------------------- side by side, managed servers
@dataclass(frozen=True)
class Load:
    rate: float
    concurrency: int | None = None

    @property
    def name(self) -> str:
        rate = "inf" if math.isinf(self.rate) else f"{self.rate:g}"
        return f"rate {rate}" + (f", concurrency {self.concurrency}" if self.concurrency else "")


def parse_loads(rates: str, concurrency: str, prompt_len: str, paths: str, output_len: int
                ) -> tuple[list[Load], tuple[int, int], list[str]]:
    """The CLI's load flags: (loads, (min, max) prompt length, paths); a ValueError names the bad flag."""
    try:
        loads = [Load(float(r)) for r in rates.split(",") if r] + \
            [Load(math.inf, int(c)) for c in concurrency.split(",") if c]
        lo, hi = (int(x) for x in prompt_len.split(","))
    except ValueError:
        raise ValueError("--rates takes numbers or inf, --concurrency and --prompt-len integers "
                         "(e.g. --rates 1,4,inf --prompt-len 32,256)") from None
    chosen = [p for p in paths.split(",") if p]
    if any(p not in PATHS for p in chosen) or not (0 < lo <= hi) or output_len < 2 or not loads:
        raise ValueError(f"--paths takes {', '.join(PATHS)}; --prompt-len needs 0 < MIN <= MAX; --output-len >= 2; "
                         "and at least one load")
    return loads, (lo, hi), chosen


def served_model(url: str, api_key: str | None) -> str:
    """The first model a running OpenAI-compatible server lists; RuntimeError if it cannot be reached."""
    import urllib.request
    request = urllib.request.Request(f"{url}/v1/models", headers=auth_headers(api_key))
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.load(r)["data"][0]["id"]
    except OSError as err:
        raise RuntimeError(f"cannot reach a server at {url}: {err}") from None


def bench_url(url: str, model: str, api_key: str | None, backend_name: str, tokenizer, workloads: list,
              loads: list[Load], repeats: int, seed: int) -> dict:
    """Every load against a running OpenAI-compatible server, ``repeats`` times (``workloads[rep * len(loads) +
    i]``: load i's prompts in repeat rep); the request form is ``backend_name``'s or probed (``auto``:
    RuntimeError where no form works)."""
    backend = NAMED_BACKENDS.get(backend_name) or probe_backend(url, model, tokenizer, auth_headers(api_key))
    runs = [{"path": "url", "engine": model, "load": asdict(load), "load_name": load.name, "repeat": rep,
             **asyncio.run(run_load(url, model, workloads[rep * len(loads) + i], load.rate, load.concurrency,
                                    seed + rep, api_key, backend, tokenizer))}
            for rep in range(repeats) for i, load in enumerate(loads)]
    return {"runs": runs, "repeats": repeats, "paired": [], "backend": vars(backend)}


def managed_engines(cfg, paths: list[str], names: str | None) -> dict[str, list[str]]:
    """bench-serve without --url: the serve arguments of each engine to start (``names``: tp, plan, all; default
    tp,plan with a plan or checkpoint, else tp,all), checked without reading weights; ValueError names the flag."""
    from ds_spd.run import resolve_run
    spec = resolve_run(cfg.updated(plan=None, checkpoint=None, spd_blocks=None), virtual_tp=cfg.tp_size,
                       read_weights=False)
    if "2hosts" in paths:
        from ds_spd.tools.serve_process import namespaces_work
        if not namespaces_work():
            raise ValueError("--paths 2hosts simulates hosts with private mount namespaces: it needs `unshare -m` "
                             "and mount (root)")
    chosen = names.split(",") if names else (["tp", "plan"] if cfg.plan or cfg.checkpoint else ["tp", "all"])
    return engines_for(cfg.plan, cfg.checkpoint, spec.model_config.num_hidden_layers, chosen)


def server_args(cfg, max_model_len: int) -> list[str]:
    """The serve arguments every started engine shares: the model, tp size, dtype and a context for the workload."""
    return ["--model", cfg.model, "--tp", str(cfg.tp_size), "--dtype", cfg.dtype, "--max-model-len", str(max_model_len)]


def engines_for(plan: str | None, checkpoint: str | None, n_layers: int, names: list[str]) -> dict[str, list[str]]:
    """serve arguments of each engine: TP (no SPD block), the plan's (or checkpoint's) blocks, every block; TP with
    eager decode steps (``eager``: ``--enforce-eager``; the others compile theirs, serve's default)."""
    table = {"tp": ["--spd-blocks", "none"], "all": ["--spd-blocks", f"0-{n_layers - 1}"],
             "eager": ["--spd-blocks", "none", "--enforce-eager"]}
    if checkpoint:
        table["plan"] = ["--checkpoint", checkpoint]
    elif plan:
        table["plan"] = ["--plan", plan]
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"engine(s) {missing} need " + ("--plan or --checkpoint" if "plan" in missing else
                                                          "one of tp, plan, all, eager"))
    return {n: table[n] for n in names}


def bench_side_by_side(base_args: list[str], engines: dict[str, list[str]], paths: list[str], loads: list[Load],
                       workloads: list, model_name: str, repeats: int, tp: int, seed: int = 0,
                       progress: bool = True) -> dict:
    """Every engine on every path, the loads in a shuffled engine order per repeat (``workloads`` as
    :func:`bench_url` takes them, and one more for the warm-up): each engine gets the same prompts."""
    from tqdm.auto import tqdm

    from ds_spd.tools.serve_process import ServerProcess
    runs = []
    total = len(paths) * repeats * len(loads) * len(engines)
    bar = tqdm(total=total, desc="bench-serve", disable=not progress)
    for path in paths:
        spec = PATHS[path]
        servers = {}
        try:
            for name, args in engines.items():
                bar.set_postfix_str(f"{path}: starting {name}")
                servers[name] = ServerProcess([*base_args, *args, "--comm", spec["comm"], "--served-model-name",
                                               model_name], nprocs=tp, hosts=tp if spec["hosts"] > 1 else 1)
            for name, srv in servers.items():   # warm-up: first-touch of the KV cache and the kernels, and every
                # batch size up to the workload's
                asyncio.run(run_load(srv.url, model_name, workloads[-1], math.inf, None, seed))
            order_rng = random.Random(seed)
            for rep in range(repeats):
                for i, load in enumerate(loads):
                    names = list(servers)
                    order_rng.shuffle(names)
                    for name in names:
                        bar.set_postfix_str(f"{path} {load.name} {name} #{rep}")
                        summary = asyncio.run(run_load(servers[name].url, model_name,
                                                       workloads[rep * len(loads) + i], load.rate,
                                                       load.concurrency, seed + rep))
                        runs.append({"path": path, "engine": name, "load": asdict(load), "load_name": load.name,
                                     "repeat": rep, **summary})
                        bar.update()
        finally:
            for srv in servers.values():
                srv.interrupt()
    bar.close()
    return {"runs": runs, "engines": engines, "paths": paths, "repeats": repeats,
            "loads": [asdict(load) for load in loads], "paired": paired_table(runs)}


def paired_table(runs: list[dict]) -> list[dict]:
    """Each non-TP engine against TP, same path, load and repeat: ratios of the medians with 95% intervals."""
    from ds_spd.tools.bench import paired_ratio
    rows = []
    key = lambda r: (r["path"], r["load_name"])  # noqa: E731
    for path, load in sorted({key(r) for r in runs}):
        base = {r["repeat"]: r for r in runs if key(r) == (path, load) and r["engine"] == "tp"}
        for engine in sorted({r["engine"] for r in runs if r["engine"] != "tp"}):
            mine = {r["repeat"]: r for r in runs if key(r) == (path, load) and r["engine"] == engine}
            reps = sorted(set(base) & set(mine))
            if not reps:
                continue
            row = {"path": path, "load": load, "engine": engine}
            for metric in ("tpot", "ttft", "e2el"):
                xs = [mine[k][metric].get("p50_ms") for k in reps]
                bs = [base[k][metric].get("p50_ms") for k in reps]
                if all(xs) and all(bs):
                    row[metric] = paired_ratio(xs, bs)
            tput = paired_ratio([mine[k]["output_throughput"] for k in reps],
                                [base[k]["output_throughput"] for k in reps])
            if "effect" in tput:   # for a throughput, above 1 is better
                tput["effect"] = {"faster": "lower", "slower": "higher"}.get(tput["effect"], tput["effect"])
            row["output_throughput"] = tput
            rows.append(row)
    return rows


def _cell(r: dict | None) -> str:
    if not r:
        return "-"
    ci = r.get("ratio_ci95")
    return f"{r['ratio']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}] {r['effect']}" if ci else "")


def _fwd(rs: list[dict]) -> str:
    """Median over the repeats of the engine's mean decode forward (ms), or - where not measured."""
    xs = [r["decode_forward_ms"] for r in rs if r.get("decode_forward_ms")]
    return f"{statistics.median(xs):.1f}" if xs else "-"


def markdown(result: dict, command: str) -> str:
    lines = [f"Command: `{command}`", "", "| path | engine | load | done/failed | req/s | out tok/s | TTFT p50 ms | "
             "TPOT p50 ms | TPOT p99 ms | ITL p50 ms | E2E p50 ms | decode forward ms |", "|" + "---|" * 12]
    groups: dict = {}
    for r in result["runs"]:
        groups.setdefault((r["path"], r["engine"], r["load_name"]), []).append(r)
    for (path, engine, load), rs in groups.items():
        med = lambda f: statistics.median(f(r) for r in rs)  # noqa: E731
        p50 = lambda m, q="p50_ms": med(lambda r: r[m].get(q, 0))  # noqa: E731
        cells = [path, engine, load, f"{sum(r['completed'] for r in rs)}/{sum(r['failed'] for r in rs)}",
                 f"{med(lambda r: r['request_throughput']):.2f}", f"{med(lambda r: r['output_throughput']):.1f}",
                 f"{p50('ttft'):.0f}", f"{p50('tpot'):.1f}", f"{p50('tpot', 'p99_ms'):.1f}", f"{p50('itl'):.1f}",
                 f"{p50('e2el'):.0f}", _fwd(rs)]
        lines.append("| " + " | ".join(cells) + " |")
    if result.get("paired"):
        lines += ["", f"Paired ratios vs TP (median of {result['repeats']} repeats, 95% interval of the geometric "
                  "mean; latencies: < 1 is faster; throughput: > 1 is higher):", "",
                  "| path | load | engine | TPOT p50 | TTFT p50 | E2E p50 | out tok/s |", "|---|---|---|---|---|---|---|"]
        for row in result["paired"]:
            lines.append(f"| {row['path']} | {row['load']} | {row['engine']} | {_cell(row.get('tpot'))} | "
                         f"{_cell(row.get('ttft'))} | {_cell(row.get('e2el'))} | {_cell(row.get('output_throughput'))} |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> str:
    """TPOT and TTFT p50 against request rate (or output throughput and TPOT against concurrency, for loads
    that only cap concurrency): colour by engine, line style by all-reduce path; medians over the repeats."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = result["runs"]
    rated = [r for r in runs if not r["load"].get("concurrency")]
    if rated:
        finite = [r["load"]["rate"] for r in rated if math.isfinite(r["load"]["rate"])]
        inf_x = (max(finite) * 2) if finite else 1.0
        xs_of = lambda r: r["load"]["rate"] if math.isfinite(r["load"]["rate"]) else inf_x  # noqa: E731
        panels = (("tpot", "TPOT p50 (ms)"), ("ttft", "TTFT p50 (ms)"))
        xlabel, chosen = f"request rate (req/s; {inf_x:g} = all at once)", rated
    else:
        xs_of = lambda r: r["load"]["concurrency"]  # noqa: E731
        panels = (("output_throughput", "output tokens/s"), ("tpot", "TPOT p50 (ms)"))
        xlabel, chosen = "concurrent requests", runs
    value = lambda r, m: r[m] if m == "output_throughput" else r[m].get("p50_ms")  # noqa: E731
    engines = sorted({r["engine"] for r in chosen})
    paths = sorted({r["path"] for r in chosen})
    colours = {e: f"C{i}" for i, e in enumerate(engines)}
    styles = {p: s for p, s in zip(paths, ("-", "--", ":", "-."))}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (metric, title) in zip(axes, panels):
        for p in paths:
            for e in engines:
                pts: dict = {}
                for r in chosen:
                    if (r["path"], r["engine"]) == (p, e) and value(r, metric):
                        pts.setdefault(xs_of(r), []).append(value(r, metric))
                xs = sorted(pts)
                ax.plot(xs, [statistics.median(pts[x]) for x in xs], styles[p], color=colours[e], marker="o",
                        label=f"{e} ({p})")
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: dict, command: str, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench_serve.json"), "w") as f:
        json.dump({**result, "command": command}, f, indent=1)
    with open(os.path.join(out_dir, "bench_serve.md"), "w") as f:
        f.write(markdown(result, command) + "\n")
    plot(result, os.path.join(out_dir, "bench_serve.png"))
