"""Peak memory of ``ds-spd eval`` with the LM head applied in chunks of tokens, against the whole batch at once.

    python scripts/benchmarks/eval_memory.py --model gemma3-270m --cap-gb 8 --out docs/results/eval_memory

Each run is a real ``python -m ds_spd eval`` process (one process, virtual TP, fp32; 32 x 256 tokens of the
pydoc test split, batch 4) inside a cgroup-v1 memory cgroup capped at ``--cap-gb`` (an OOM is recorded, not a
crashed machine). Its peak resident set is the kernel's high-water mark of the process (``ru_maxrss`` of the
waited child). Two settings of the logits budget (``DS_SPD_LOGITS_MB``): the default, and one larger than a
whole batch's logits, which is what eval did before the head was chunked (the model's forward made fp32 logits
of ``[batch, tokens, vocab]`` at once). Both must give the same perplexity. Writes eval_memory.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from scale_bench import GB, MemoryCap  # noqa: E402

from ds_spd.outputs import MD_MARK, check_output_dir, write_atomic, write_json  # noqa: E402


def run(args, budget_mb: float | None, cap: MemoryCap) -> dict:
    cmd = [sys.executable, "-m", "ds_spd", "eval", "--model", args.model, "--virtual-tp", str(args.tp),
           "--max-samples", str(args.segments), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
           "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    if budget_mb is not None:
        env["DS_SPD_LOGITS_MB"] = str(budget_mb)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run(cap.wrap(cmd), capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    row = {"logits_budget_mb": budget_mb or "default (128)", "returncode": proc.returncode, "seconds": round(seconds, 1),
           "oom_kills": cap.oom_kills(),
           # ru_maxrss of the children is the largest any child reached: valid only when it grew in this run
           "peak_rss_gib": round(peak_kb / 2**20, 3) if peak_kb > before else None}
    if proc.returncode == 0:
        result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
        row.update(perplexity=result["perplexity"], tokens=result["tokens"])
    else:
        row["stderr_tail"] = proc.stderr[-1500:]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--segments", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--cap-gb", type=float, default=8)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    check_output_dir(args.out, "eval memory output", names=("eval_memory.json", "eval_memory.md"))
    cap = MemoryCap(f"ds_spd_eval_memory_{os.getpid()}", int(args.cap_gb * GB))
    try:
        # the larger run last: ru_maxrss of the children only grows, so each run's own peak is readable
        rows = [run(args, None, cap), run(args, 1e6, cap)]
    finally:
        cap.remove()
    command = "python scripts/benchmarks/eval_memory.py " + " ".join(sys.argv[1:])
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "eval_memory.json"), {"command": command, "rows": rows,
                                                            "cap_gb": args.cap_gb}, "eval_memory")
    lines = [MD_MARK, f"`{command}`", "", "| logits per head call | peak RSS (GiB) | perplexity | seconds | exit |",
             "|---|---|---|---|---|"]
    for r in rows:
        label = "whole batch (before chunking)" if r["logits_budget_mb"] == 1e6 else "≤ 128 MiB (default)"
        lines.append(f"| {label} | {r['peak_rss_gib']} | {r.get('perplexity', '-')} | {r['seconds']} | "
                     f"{r['returncode']}{' (OOM)' if r['oom_kills'] else ''} |")
    write_atomic(os.path.join(args.out, "eval_memory.md"), "\n".join(lines) + "\n")
    print("\n".join(lines[1:]))


if __name__ == "__main__":
    main()
