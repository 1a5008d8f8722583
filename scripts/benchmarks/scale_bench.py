"""Per-rank peak memory and wall time of TP runs on large random LLaMA-shaped models, both loaders.

    python scripts/tools/make_random_llama.py --shape 7b --out /work/scale/llama7b     # and 1.1b, 3b
    python scripts/benchmarks/scale_bench.py --models /work/scale/llama1.1b,/work/scale/llama3b,/work/scale/llama7b \\
        --cap-gb 21 --out docs/results/scale

Each run is a real ``deepspeed --num_gpus 2 --module ds_spd ...`` command (bf16, tp 2) started inside a
cgroup-v1 memory cgroup capped at ``--cap-gb`` for the whole job, so a load that does not fit is recorded
as an OOM kill instead of taking the machine down. While it runs, every rank's kernel high-water mark
(``VmHWM`` in /proc/PID/status: peak resident set, file-mapped pages included) is sampled; the last
sample of each rank is its peak. Runs: ``eval`` of 1 × 64 tokens with ``--load sharded`` and
``--load full`` (DeepSpeed AutoTP's standard path: every rank loads the whole model, then shards it);
``generate`` of 8 tokens with half the blocks in SPD form (sharded); the streamed ``scan`` of the last 4
blocks (1 × 64 tokens, one process); layer-wise ``distill`` of the scan's 2 least sensitive blocks
(1 epoch, 2 × 64 tokens, 2 data-parallel ranks, ZeRO-2); ``generate`` with those distilled blocks
re-injected (sharded load + checkpoint overlay). Bounds per rank: TP runs 1.15 × bytes/tp + 1.5 GB;
streamed stages 6 × one block in fp32 + the activation budget + embedding and lm_head in fp32 + 1.5 GB.
Writes scale.json, scale.md and scale.png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ds_spd.outputs import MD_MARK, check_output_dir, write_atomic, write_json  # noqa: E402

CGROUP_ROOT = "/sys/fs/cgroup/memory"
GB = 2**30


class MemoryCap:
    """A cgroup-v1 memory cgroup with a hard limit; processes started through :meth:`wrap` join it."""

    def __init__(self, name: str, limit_bytes: int):
        self.path = os.path.join(CGROUP_ROOT, name)
        if not os.path.isdir(CGROUP_ROOT) or not os.access(CGROUP_ROOT, os.W_OK):
            sys.exit(f"error: no writable cgroup-v1 memory controller at {CGROUP_ROOT} (needed for the cap)")
        os.makedirs(self.path, exist_ok=True)
        self._write("memory.limit_in_bytes", str(limit_bytes))

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def _read(self, name: str) -> str:
        with open(os.path.join(self.path, name)) as f:
            return f.read()

    def wrap(self, cmd: list[str]) -> list[str]:
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh", *cmd]

    def oom_kills(self) -> int:
        fields = dict(line.split() for line in self._read("memory.oom_control").splitlines())
        return int(fields.get("oom_kill", 0))

    def peak(self) -> int:
        return int(self._read("memory.max_usage_in_bytes"))

    def reset_peak(self) -> None:
        self._write("memory.max_usage_in_bytes", "0")

    def remove(self) -> None:
        try:
            os.rmdir(self.path)
        except OSError:
            pass


def _rank_processes(root_pid: int) -> dict[int, int]:
    """{pid: rank} of the ds_spd rank processes below ``root_pid``."""
    import psutil
    out = {}
    try:
        for child in psutil.Process(root_pid).children(recursive=True):
            try:
                cmd = child.cmdline()
            except psutil.Error:
                continue
            rank = next((a.split("=", 1)[1] for a in cmd if a.startswith("--local_rank=")), None)
            if rank is not None and "ds_spd" in cmd:
                out[child.pid] = int(rank)
    except psutil.Error:
        pass
    return out


def _hwm_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def run_measured(cmd: list[str], cap: MemoryCap, timeout: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cap.reset_peak()
    kills_before = cap.oom_kills()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cap.wrap(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peaks: dict[int, int] = {}
    ranks: dict[int, int] = {}
    lines: list[str] = []
    import threading
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            break
        ranks.update(_rank_processes(proc.pid) or ({proc.pid: 0} if "deepspeed" not in cmd[0] else {}))
        for pid, rank in ranks.items():
            kb = _hwm_kb(pid)
            if kb is not None:
                peaks[rank] = max(peaks.get(rank, 0), kb)
        time.sleep(0.05)
    proc.wait()
    reader.join(timeout=5)
    wall = time.perf_counter() - t0
    result = next((json.loads(line) for line in reversed(lines) if line.startswith("{")), None)
    return {"returncode": proc.returncode, "wall_s": round(wall, 2), "oom_killed": cap.oom_kills() > kills_before,
            "peak_rss_gb_per_rank": {str(r): round(kb * 1024 / GB, 3) for r, kb in sorted(peaks.items())},
            "cgroup_peak_gb": round(cap.peak() / GB, 3), "result": result,
            "log_tail": [line.rstrip()[:300] for line in lines[-6:]] if proc.returncode else []}


def model_bytes(model_dir: str) -> int:
    with open(os.path.join(model_dir, "model.safetensors.index.json")) as f:
        return json.load(f)["metadata"]["total_size"]


def block_fp32_bytes(cfg: dict) -> int:
    h, kv = cfg["hidden_size"], cfg["num_key_value_heads"] * (cfg["hidden_size"] // cfg["num_attention_heads"])
    return 4 * (2 * h * h + 2 * kv * h + 3 * h * cfg["intermediate_size"] + 2 * h)


def commands(model_dir: str, cfg: dict, work: str, budget_gb: float) -> dict[str, tuple[list[str], float]]:
    """run name -> (command, its per-rank memory bound in GB)."""
    python = [sys.executable, "-m", "ds_spd"]
    launcher = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--module", "ds_spd"]
    common = ["--model", model_dir, "--tp", "2", "--dtype", "bfloat16", "--json"]
    data = ["--max-samples", "1", "--seq-len", "64", "--batch-size", "1"]
    n_layers = cfg["num_hidden_layers"]
    size = model_bytes(model_dir) / GB
    tp_bound = 1.15 * size / 2 + 1.5
    # streamed stages: 6 x one block in fp32 + activations + embedding and lm_head (fp32) + 1.5 GB
    stage_bound = (6 * block_fp32_bytes(cfg) + 2 * 4 * cfg["vocab_size"] * cfg["hidden_size"]) / GB + budget_gb + 1.5
    plan, ck = os.path.join(work, "scan.json"), os.path.join(work, "checkpoint")
    return {
        "eval sharded": ([*launcher, "eval", *common, *data, "--load", "sharded"], tp_bound),
        "eval full (AutoTP standard)": ([*launcher, "eval", *common, *data, "--load", "full"], tp_bound),
        "generate 8 sharded": ([*launcher, "generate", *common, "--spd-blocks", f"{n_layers // 2}-{n_layers - 1}",
                                "--max-new-tokens", "8", "--prompt", "def main"], tp_bound),
        "scan last 4 (streamed, 1 process)": ([*python, "scan", "--model", model_dir, "--virtual-tp", "2", "--dtype",
                                               "bfloat16", *data, "--last", "4", "--activation-budget", str(budget_gb),
                                               "--out", plan, "--json"], stage_bound),
        "distill 2 blocks (layer-wise, 2 ranks)": ([*launcher, "distill", "--plan", plan + ".distill.json", "--model",
                                                    model_dir, "--max-samples", "2", "--seq-len", "64", "--epochs", "1",
                                                    "--activation-budget", str(budget_gb), "--out", ck, "--json"],
                                                   stage_bound),
        "generate 8 with the distilled blocks": ([*launcher, "generate", *common, "--checkpoint", ck,
                                                  "--max-new-tokens", "8", "--prompt", "def main"], tp_bound),
    }


def distill_plan(scan_plan: str) -> None:
    """The scanned plan with its two least sensitive scanned blocks as SB (trained), written beside it."""
    from ds_spd.plan import load_plan
    from ds_spd.stages.planner import ranking
    plan = load_plan(scan_plan)
    chosen = ranking(plan)[:2]
    for b in plan.blocks:
        b.cls = "SB" if b.index in chosen else "TP"
    plan.save(scan_plan + ".distill.json")


def plot(rows: list[dict], cap_gb: float, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ds_spd.tools.plots import save_figure
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = sorted({r["model_gb"] for r in rows})
    ax.plot(sizes, [1.15 * s / 2 + 1.5 for s in sizes], "k--", lw=1, label="bound 1.15 × bytes/tp + 1.5 GB")
    ax.plot(sizes, sizes, ":", color="gray", lw=1, label="whole model (bytes)")
    for run, color in (("eval sharded", "tab:green"), ("eval full (AutoTP standard)", "tab:red"),
                       ("generate 8 sharded", "tab:blue"), ("scan last 4 (streamed, 1 process)", "tab:purple"),
                       ("distill 2 blocks (layer-wise, 2 ranks)", "tab:orange"),
                       ("generate 8 with the distilled blocks", "tab:cyan")):
        pts = [(r["model_gb"], r) for r in rows if r["run"] == run]
        ok = [(s, r["max_rank_peak_gb"]) for s, r in pts if r["returncode"] == 0]
        if ok:
            ax.plot(*zip(*ok), marker="o", color=color, label=f"{run}: peak RSS per rank")
        oom = [s for s, r in pts if r["returncode"] != 0]
        if oom:
            ax.scatter(oom, [cap_gb / 2] * len(oom), marker="x", s=80, color=color,
                       label=f"{run}: killed (cap {cap_gb:g} GB for both ranks)")
    ax.set(xlabel="model size (GB, bf16)", ylabel="peak RSS per rank (GB)",
           title="peak RSS per rank (tp 2; scan: one process)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help="comma-separated model directories (make_random_llama.py)")
    p.add_argument("--cap-gb", type=float, default=21.0, help="memory cap for each whole job (both ranks)")
    p.add_argument("--runs", default=None, help="comma-separated subset of the run names")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", default="docs/results/scale")
    p.add_argument("--work", default="runs/scale", help="plans and checkpoints the runs write")
    p.add_argument("--activation-budget", type=float, default=0.25, help="GB, for the streamed scan and distill")
    p.add_argument("--render", metavar="SCALE_JSON", help="only re-render the Markdown and plot of a scale.json")
    args = p.parse_args()
    check_output_dir(args.out, "results directory", names=("scale.json", "scale.md", "scale.png"))
    if args.render:
        with open(args.render) as f:
            return render(json.load(f), args.out)
    if not args.models:
        p.error("--models is required (unless --render)")
    cap = MemoryCap(f"ds_spd_scale_{os.getpid()}", int(args.cap_gb * GB))
    rows = []
    try:
        for model_dir in args.models.split(","):
            with open(os.path.join(model_dir, "config.json")) as f:
                cfg = json.load(f)
            size = model_bytes(model_dir) / GB
            work = os.path.join(args.work, os.path.basename(model_dir.rstrip(os.sep)))
            os.makedirs(work, exist_ok=True)
            for run, (cmd, bound) in commands(model_dir, cfg, work, args.activation_budget).items():
                if args.runs and run not in args.runs.split(","):
                    continue
                print(f"{os.path.basename(model_dir)}: {run} ...", flush=True)
                r = run_measured(cmd, cap, args.timeout)
                if run.startswith("scan") and r["returncode"] == 0:
                    distill_plan(os.path.join(work, "scan.json"))
                peaks = r["peak_rss_gb_per_rank"].values()
                row = {"model": os.path.basename(model_dir), "model_gb": round(size, 3),
                       "layers": cfg["num_hidden_layers"], "run": run, "bound_gb": round(bound, 3),
                       "max_rank_peak_gb": max(peaks) if peaks else None, "command": " ".join(cmd), **r}
                row["within_bound"] = r["returncode"] == 0 and row["max_rank_peak_gb"] <= row["bound_gb"]
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("model", "run", "returncode", "oom_killed", "wall_s",
                                                      "peak_rss_gb_per_rank", "bound_gb")}), flush=True)
    finally:
        cap.remove()
    render({"cap_gb": args.cap_gb, "activation_budget_gb": args.activation_budget, "cpu": os.cpu_count(),
            "command": " ".join([sys.executable, *sys.argv]), "rows": rows}, args.out)


def render(result: dict, out: str) -> None:
    """scale.json, scale.md and scale.png from the measured rows."""
    rows = result["rows"]
    write_json(os.path.join(out, "scale.json"), result, "scale/1")
    lines = [MD_MARK, f"Cap: {result['cap_gb']:g} GB for each whole job (both ranks); bf16 weights, tp 2, 2 CPU "
             f"ranks; activation budget {result['activation_budget_gb']:g} GB. Command: `{result['command']}`", "",
             "| model | GB | run | exit | peak RSS rank 0 / 1 (GB) | bound (GB) | within | load (s) | wall (s) |",
             "|---" * 9 + "|"]
    for r in rows:
        peaks = " / ".join(f"{v:.2f}" for v in r["peak_rss_gb_per_rank"].values()) or "—"
        status = "ok" if r["returncode"] == 0 else ("OOM-killed" if r["oom_killed"] else f"rc {r['returncode']}")
        load = (r["result"] or {}).get("load_seconds")
        lines.append(f"| {r['model']} | {r['model_gb']:.2f} | {r['run']} | {status} | {peaks} | {r['bound_gb']:.2f} "
                     f"| {'yes' if r['within_bound'] else 'no'} | {'—' if load is None else f'{load:.1f}'} "
                     f"| {r['wall_s']:.0f} |")
    write_atomic(os.path.join(out, "scale.md"), "\n".join(lines) + "\n")
    plot(rows, result["cap_gb"], os.path.join(out, "scale.png"))
    print("\n".join(lines[1:]))


if __name__ == "__main__":
    main()
