"""Latency benchmark: unmodified DeepSpeed AutoTP vs ds_spd at several SPD fractions, per all-reduce path.

Run under the launcher (``deepspeed --num_gpus N --module ds_spd bench``). Every configuration is measured
in the same processes, interleaved repeat by repeat (so drift hits all alike), warm-up excluded:

- prefill: one forward of ``batch x prefill_len`` tokens;
- decode: ms per token of greedy steps with a KV cache after a short prompt, batch 1 and 8.

Every repeat runs every configuration once, in a freshly shuffled order (seeded, the same on all ranks), so
slow drift and order effects hit all configurations alike. Each figure is reported as a *paired ratio* to
its path's 0%-SPD configuration measured in the same repeat (AutoTP, whose all-reduces follow the path
too: to ds_spd at 0% SPD on that path), with a 95% interval (t over the log-ratios of the repeats); a ratio
whose interval contains 1 is marked "no effect". Noise is detected and reported (a warning line in the
report, the Markdown and the JSON): CPU used by other processes during the run, and a 0%-SPD spread
(max-min over median) above 10%.

Per configuration it records the all-reduce count, the time of the whole reduces per forward (the copy,
the call and its wait for the other ranks: everything a dropped sync removes from the block), the time
outside them, the paired saving, and how much of that saving the dropped reduces' own time explains. The
*ideal* latency (0%-SPD latency minus the dropped reduces' time) assumes a dropped sync saves exactly its
own time; it is not an upper bound: on the gloo path the time outside the calls also falls as syncs are
dropped (an explained share below 100%).

Above the model's KV-head count the AutoTP baseline gets ds_spd's attention split (KV heads replicated,
ds_spd.core.replicate): stock AutoTP would hand some ranks empty attention shards there.
"""
from __future__ import annotations

import contextlib
import copy
import os
import random
import statistics
import time

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ds_spd.build import build_engine
from ds_spd.tools.settings import BenchSettings
from ds_spd.core.inject import decoder_layers, model_device, set_spd_blocks
from ds_spd.outputs import MD_MARK
from ds_spd.tools.plots import save_figure


def launch_command(tp_size: int, argv: list[str]) -> str:
    """The command line a bench result records (the launcher's own --local_rank left out)."""
    return "OMP_NUM_THREADS=%s deepspeed --num_gpus %d --module ds_spd %s" % (
        os.environ.get("OMP_NUM_THREADS", "?"), tp_size, " ".join(a for a in argv if "--local_rank" not in a))


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def time_prefill(model, ids: torch.Tensor) -> float:
    _sync()
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    _sync()
    return time.perf_counter() - start


@torch.no_grad()
def time_decode(model, prompt: torch.Tensor, steps: int, on_start=lambda: None) -> float:
    """Seconds per decode step (one token per sequence), KV cache, after prefilling ``prompt``;
    ``on_start`` runs between the prompt and the timed steps (to reset the all-reduce accounting)."""
    from transformers import DynamicCache
    cache = DynamicCache()
    out = model(input_ids=prompt, cache=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    on_start()
    _sync()
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=nxt, cache=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    _sync()
    return (time.perf_counter() - start) / steps


def spd_sets(n_layers: int, fractions, order: list[int] | None = None) -> dict[str, list[int]]:
    """SPD block sets per fraction: the plan's least sensitive blocks first, else from the last block back."""
    order = order or list(range(n_layers - 1, -1, -1))
    return {f"spd{round(100 * f)}": sorted(order[:round(f * n_layers)]) for f in fractions}


def bench_run(spec, settings: BenchSettings, order: list[int] | None, out_dir: str, command: str,
              progress: bool = True) -> dict:
    """The ``bench`` stage: load the model of a resolved real-TP run (no SPD blocks), measure, and write
    bench.json / .md / .png on rank 0 (``out_dir`` was checked before)."""
    import os

    from ds_spd.models.loading import load_model
    from ds_spd.ranks import is_main_rank
    model, _ = load_model(spec.config.model, spec.config.torch_dtype)
    result = run_bench(model, spec, settings, order, progress)
    result.update({"model": spec.config.model, "tp_size": spec.tp_size, "dtype": spec.config.dtype,
                   "omp_num_threads": os.environ.get("OMP_NUM_THREADS")})
    if is_main_rank():
        write_outputs(result, command, out_dir)
    return result


def run_bench(model, spec, settings: BenchSettings, order: list[int] | None = None, progress: bool = True) -> dict:
    """``model``: the HF model (not yet sharded), ``spec``: its resolved real-TP run without SPD blocks.
    Returns the results dict (identical on every rank)."""
    import deepspeed

    from ds_spd.core.comm import init_comm
    cfg = spec.config
    init_comm()   # before the first engine: DeepSpeed's CPU comm reads the environment
    base_model = copy.deepcopy(model)
    if spec.layout.kv_replicas > 1:   # stock AutoTP would give empty attention shards: replicate KV heads as ds_spd does
        from ds_spd.core.replicate import shard_attention
        shard_attention(decoder_layers(base_model), spec.layout, torch.distributed.get_rank(), spec.adapter)
    baseline = deepspeed.init_inference(base_model, tensor_parallel={"tp_size": cfg.tp_size,
                                                                     "tp_grain_size": cfg.tp_grain_size},
                                        dtype=cfg.torch_dtype, replace_with_kernel_inject=False)
    engine = build_engine(model, spec)
    # both engines must hold the same shards, or the comparison is not like for like (the grain sets the MLP split)
    shards, attn_shards = ({name: [decoder_layers(e.module)[0].get_submodule(part).weight.shape[1]]
                            for name, e in (("autotp", baseline), ("ds_spd", engine))}
                           for part in ("mlp.down_proj", "self_attn.o_proj"))
    if shards["autotp"] != shards["ds_spd"] or attn_shards["autotp"] != attn_shards["ds_spd"]:
        raise RuntimeError(f"AutoTP baseline and ds_spd engine shard differently: MLP columns {shards}, "
                           f"attention columns {attn_shards}")
    n_layers = len(decoder_layers(engine.module))
    sets = spd_sets(n_layers, settings.fractions, order)
    reducers = {layer.reduce for layer in decoder_layers(engine.module)}
    configs = [("autotp", path, None) for path in settings.comm_paths] + \
        [(name, path, blocks) for path in settings.comm_paths for name, blocks in sets.items()]
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    device = model_device(engine)
    workloads = {"prefill": torch.randint(0, vocab, (1, settings.prefill_len), generator=gen).to(device)}
    for b in settings.decode_batches:
        workloads[f"decode_b{b}"] = torch.randint(0, vocab, (b, settings.decode_prompt), generator=gen).to(device)
    samples = {(name, path, w): [] for name, path, _ in configs for w in workloads}
    comm = {}
    noise = NoiseProbe()
    for rep in tqdm(range(settings.warmup + settings.repeats), desc="bench", disable=not progress):
        order = list(configs)
        random.Random(settings.seed * 1000 + rep).shuffle(order)   # same order on every rank
        for name, path, blocks in order:
            target = baseline.module if name == "autotp" else engine.module
            if name != "autotp":
                for r in reducers:
                    r.path = path
                set_spd_blocks(engine.module, blocks)
            for w, ids in workloads.items():
                engine.spd_stats.reset()
                with autotp_path(path if name == "autotp" else "auto"):
                    seconds = time_prefill(target, ids) if w == "prefill" else \
                        time_decode(target, ids, settings.decode_tokens, engine.spd_stats.reset)
                if rep >= settings.warmup:
                    samples[(name, path, w)].append(seconds)
                    if name != "autotp":
                        comm.setdefault((name, path, w), []).append(engine.spd_stats.summary())
    result = summarize(configs, workloads, samples, comm, settings, n_layers)
    result["noise"] = noise.finish()
    result["warnings"] = noise_warnings(result)
    return {**result, "tp_grain_size": cfg.tp_grain_size, "mlp_columns_rank0_layer0": shards,
            "attention_columns_rank0_layer0": attn_shards}


@contextlib.contextmanager
def autotp_path(path: str):
    """AutoTP's own all-reduces (DeepSpeed's ``inference_all_reduce``, lm_head included) on ``path``: "gloo"
    switches DeepSpeed's shared-memory kernel off for the duration (its backend then falls back to
    ``torch.distributed.all_reduce``, as ds_spd arranges across hosts: ds_spd.core.comm.init_comm)."""
    import deepspeed.comm.comm as ds_comm
    cdb = ds_comm.cdb
    if path != "gloo" or cdb is None or not hasattr(cdb, "shm_vector_kernel_level"):
        yield
        return
    saved, cdb.shm_vector_kernel_level = cdb.shm_vector_kernel_level, 0
    try:
        yield
    finally:
        cdb.shm_vector_kernel_level = saved


class NoiseProbe:
    """CPU used by processes other than this run's ranks, sampled at the start and the end of the bench,
    and the load average (1 min) at both points."""

    def __init__(self):
        import os
        self.pids = {os.getpid()}
        if dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, os.getpid())
            self.pids = set(gathered)
        self.start = self._sample()

    def _sample(self) -> dict:
        import os

        import psutil
        procs = [p for p in psutil.process_iter() if p.pid not in self.pids and p.pid != os.getppid()]
        for p in procs:
            try:
                p.cpu_percent(None)
            except psutil.Error:
                pass
        time.sleep(1.0)
        used = 0.0
        for p in procs:
            try:
                used += p.cpu_percent(None)
            except psutil.Error:
                pass
        return {"other_processes_cpu_percent": round(used, 1), "loadavg_1min": round(os.getloadavg()[0], 2)}

    def finish(self) -> dict:
        import os
        return {"start": self.start, "end": self._sample(), "cpus": os.cpu_count()}


def noise_warnings(result: dict) -> list[str]:
    warnings = []
    noise = result["noise"]
    busy = max(noise["start"]["other_processes_cpu_percent"], noise["end"]["other_processes_cpu_percent"])
    if busy > 20:
        warnings.append(f"other processes used {busy:.0f}% of a CPU during the run: timings are not from a quiet "
                        "machine")
    for r in result["rows"]:
        if r["config"] == "spd0" and r["spread"] > 0.10:
            warnings.append(f"{r['workload']} on {r['comm']}: 0%-SPD spread {100 * r['spread']:.0f}% of the median "
                            "over the repeats: noisy")
    return warnings


def paired_ratio(xs: list[float], base: list[float]) -> dict:
    """Median ratio of paired repeats and a 95% t-interval of the geometric mean ratio."""
    import math
    ratios = [x / b for x, b in zip(xs, base)]
    out = {"ratio": statistics.median(ratios), "n_pairs": len(ratios)}
    if len(ratios) >= 2:
        from scipy import stats
        logs = [math.log(r) for r in ratios]
        half = stats.t.ppf(0.975, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
        lo, hi = math.exp(statistics.mean(logs) - half), math.exp(statistics.mean(logs) + half)
        out.update({"ratio_ci95": [lo, hi], "effect": "no effect" if lo <= 1 <= hi else
                    ("faster" if hi < 1 else "slower")})
    return out


def _stats(xs: list[float]) -> dict:
    return {"median_ms": 1e3 * statistics.median(xs), "min_ms": 1e3 * min(xs), "max_ms": 1e3 * max(xs),
            "spread": (max(xs) - min(xs)) / statistics.median(xs), "n": len(xs)}


def summarize(configs, workloads, samples, comm, settings, n_layers) -> dict:
    rows = []
    for name, path, blocks in configs:
        for w in workloads:
            xs = samples[(name, path, w)]
            row = {"config": name, "comm": path, "workload": w,
                   "spd_blocks": None if blocks is None else len(blocks), **_stats(xs)}
            if (name, path, w) in comm:
                runs = comm[(name, path, w)]   # one per repeat, paired with xs
                row["allreduce_per_forward"] = statistics.median(r["allreduce_per_forward"] for r in runs)
                row["allreduce_ms_per_forward"] = 1e3 * statistics.median(
                    r["allreduce_seconds_per_forward"] for r in runs)
                row["outside_ms_per_forward"] = 1e3 * statistics.median(
                    x - r["allreduce_seconds_per_forward"] for x, r in zip(xs, runs))
            base = ("spd0", path, w)   # AutoTP too: against ds_spd 0% on the same all-reduce path
            if name != "spd0" and base in samples:
                row.update(paired_ratio(xs, samples[base]))
                row["saving_ms"] = 1e3 * statistics.median(b - x for x, b in zip(xs, samples[base]))
            rows.append(row)
    _explained(rows)
    return {"settings": vars(settings), "n_layers": n_layers, "rows": rows}


def _explained(rows) -> None:
    """What the dropped all-reduces' own time explains of each SPD row's measured saving.

    ``dropped_allreduce_ms``: the dropped syncs times the 0% row's measured cost per whole reduce (copy, call,
    wait for the other ranks); ``ideal_ms``: the 0% latency minus that, i.e. assuming a dropped sync saves
    exactly its own time and nothing around it; ``explained_share``: dropped time / measured paired saving,
    given only where the saving is demonstrated (interval below 1). Above 1: the saving is smaller than the
    dropped time; below 1: time outside the calls fell too (so the ideal is not an upper bound)."""
    zero = {(r["comm"], r["workload"]): r for r in rows if r["config"] == "spd0"}
    for r in rows:
        z = zero.get((r["comm"], r["workload"]))
        if z is None or r["config"] in ("autotp", "spd0") or "allreduce_ms_per_forward" not in z:
            continue
        per_ar = z["allreduce_ms_per_forward"] / z["allreduce_per_forward"]
        r["dropped_allreduce_ms"] = (z["allreduce_per_forward"] - r["allreduce_per_forward"]) * per_ar
        r["ideal_ms"] = z["median_ms"] - r["dropped_allreduce_ms"]  # a row's time is one forward (prefill or decode step)
        demonstrated = r.get("effect") == "faster" and r["saving_ms"] > 0
        r["explained_share"] = r["dropped_allreduce_ms"] / r["saving_ms"] if demonstrated else None


OUTPUT_FILES = ("bench.json", "bench.md", "bench.png")


def write_outputs(result: dict, command: str, out_dir: str) -> None:
    """bench.json, bench.md and bench.png in ``out_dir`` (checked before the run: ds_spd.outputs)."""
    import os

    from ds_spd.outputs import write_atomic, write_json
    write_json(os.path.join(out_dir, "bench.json"), {**result, "command": command}, "bench/1")
    write_atomic(os.path.join(out_dir, "bench.md"), markdown(result, command))
    plot(result, os.path.join(out_dir, "bench.png"))


def markdown(result: dict, command: str) -> str:
    lines = [MD_MARK, f"Command: `{command}`", ""]
    lines += [f"**Warning: {w}**" for w in result.get("warnings", [])] + ([""] if result.get("warnings") else [])
    lines += ["| workload | config | all-reduce path | SPD blocks | median ms | min-max ms | paired ratio to 0% SPD "
              "(95% CI) | all-reduces / fwd | all-reduce ms / fwd | outside all-reduce ms / fwd | saving ms (paired) "
              "| dropped all-reduce ms | share of saving explained |",
              "|---" * 13 + "|"]
    for r in sorted(result["rows"], key=lambda r: (_workload_key(r["workload"]), r["comm"], r["spd_blocks"] or 0)):
        f = lambda k, fmt: format(r[k], fmt) if r.get(k) is not None else "-"  # noqa: E731
        ratio = "-" if "ratio" not in r else f"{r['ratio']:.3f}" + (
            f" ({r['ratio_ci95'][0]:.3f}-{r['ratio_ci95'][1]:.3f}, {r['effect']})" if "ratio_ci95" in r else "")
        lines.append(f"| {r['workload']} | {r['config']} | {r['comm']} | {f('spd_blocks', 'd')} | "
                     f"{r['median_ms']:.2f} | {r['min_ms']:.2f}-{r['max_ms']:.2f} | {ratio} | "
                     f"{f('allreduce_per_forward', '.0f')} | {f('allreduce_ms_per_forward', '.2f')} | "
                     f"{f('outside_ms_per_forward', '.2f')} | {f('saving_ms', '.2f')} | "
                     f"{f('dropped_allreduce_ms', '.2f')} | {f('explained_share', '.0%')} |")
    return "\n".join(lines) + "\n"


def _workload_key(w: str):
    return (w == "prefill", int(w.split("_b")[1]) if "_b" in w else 0)


def plot(result: dict, path: str) -> str:
    """Per workload: each path's paired ratio to its 0%-SPD configuration with its 95% interval (the measured
    effect), the ratio the dropped reduces' own time predicts (dotted), AutoTP's ratio (dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    workloads = sorted({r["workload"] for r in result["rows"]}, key=_workload_key)
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.5 * len(workloads), 4), squeeze=False)
    for ax, w in zip(axes[0], workloads):
        rows = [r for r in result["rows"] if r["workload"] == w]
        zero = {r["comm"]: r for r in rows if r["config"] == "spd0"}
        for path_name in sorted(zero):
            pts = sorted((r["spd_blocks"], r) for r in rows
                         if r["comm"] == path_name and r["config"] != "autotp" and "ratio_ci95" in r)
            xs = [0] + [p for p, _ in pts]
            ys = [1.0] + [r["ratio"] for _, r in pts]
            err = [[0] + [r["ratio"] - r["ratio_ci95"][0] for _, r in pts],
                   [0] + [r["ratio_ci95"][1] - r["ratio"] for _, r in pts]]
            line = ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"ds_spd, {path_name} (95% CI)")
            ideal = [(p, r["ideal_ms"] / zero[path_name]["median_ms"]) for p, r in pts if "ideal_ms" in r]
            if ideal:
                ax.plot([0] + [p for p, _ in ideal], [1.0] + [v for _, v in ideal], ls=":",
                        color=line[0].get_color(), label=f"dropped reduces' own time, {path_name}")
            for r in rows:
                if r["config"] == "autotp" and r["comm"] == path_name and "ratio" in r:
                    ax.axhline(r["ratio"], color=line[0].get_color(), ls="--", lw=1,
                               label=f"DeepSpeed AutoTP, {path_name} (vs ds_spd 0%)")
        ax.axhline(1.0, color="black", lw=0.5)
        ax.set(title=w, xlabel="SPD blocks", ylabel="latency / 0%-SPD latency (paired)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
