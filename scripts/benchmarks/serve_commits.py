"""Serving throughput of two commits, run alternately on the same workload: ``ds-spd bench-serve --url`` against
``launch/tp.sh 2 serve`` started from a git worktree of each commit, in rounds (A B, B A, ...), so drift on a
shared machine falls on both. Writes every run and the per-round ratios B/A to OUT/serve_commits.json.

    OMP_NUM_THREADS=1 python scripts/benchmarks/serve_commits.py A_COMMIT B_COMMIT --rounds 2 --out runs/serve_commits \
        -- --prompt-len 150,250 --output-len 32 --concurrency 1,8 --rates "" --num-requests 16 --repeats 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from ds_spd.tools.bench_serve import bench_url_cli  # noqa: E402
from ds_spd.tools.serve_process import ServerProcess  # noqa: E402


def worktree(commit: str, where: str) -> str:
    path = os.path.join(where, commit[:12])
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-f", path, commit], check=True,
                   capture_output=True)
    return path


def bench(tree: str, serve_args: list[str], bench_args: list[str], out: str) -> list[dict]:
    """Start the tree's server on 2 ranks (its own code: PYTHONPATH is the tree), bench it, stop it."""
    srv = ServerProcess(serve_args, env={"PYTHONPATH": tree}, root=tree)
    try:
        return bench_url_cli(srv.url, bench_args, out, cwd=ROOT)
    finally:
        srv.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="runs/serve_commits")
    ap.add_argument("--serve-args", default="", help="extra ds-spd serve flags")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args, bench_args = ap.parse_args(argv[:cut]), argv[cut + 1:]   # after --: ds-spd bench-serve flags
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        trees = {c: worktree(c, tmp) for c in (args.a, args.b)}
        runs = []
        try:
            for r in range(args.rounds):
                for c in ((args.a, args.b) if r % 2 == 0 else (args.b, args.a)):
                    for run in bench(trees[c], args.serve_args.split(), bench_args, os.path.join(tmp, f"bs{r}{c}")):
                        runs.append({"commit": c, "round": r, **run})
                        print(f"round {r} {c[:8]} {run['load_name']}: {run['output_throughput']:.1f} tok/s, "
                              f"TTFT p50 {run['ttft']['p50_ms']:.0f} ms", flush=True)
        finally:
            for path in trees.values():
                subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", path], capture_output=True)
    ratios = {}
    for load in sorted({r["load_name"] for r in runs}):
        pairs = [[next(x for x in runs if x["commit"] == c and x["round"] == r and x["load_name"] == load)
                  for c in (args.a, args.b)] for r in range(args.rounds)]
        ratios[load] = {"throughput_b_over_a": [b["output_throughput"] / a["output_throughput"] for a, b in pairs],
                        "ttft_p50_ms": {"a": [a["ttft"]["p50_ms"] for a, _ in pairs],
                                        "b": [b["ttft"]["p50_ms"] for _, b in pairs]},
                        "throughput": {"a": [a["output_throughput"] for a, _ in pairs],
                                       "b": [b["output_throughput"] for _, b in pairs]}}
        ratios[load]["median_ratio"] = statistics.median(ratios[load]["throughput_b_over_a"])
    command = "python scripts/benchmarks/serve_commits.py " + " ".join(sys.argv[1:])
    json.dump({"command": command, "a": args.a, "b": args.b, "runs": runs, "ratios": ratios},
              open(os.path.join(args.out, "serve_commits.json"), "w"), indent=1)
    print(json.dumps(ratios, indent=1))


if __name__ == "__main__":
    main()
