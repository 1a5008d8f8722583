"""Is a change free? `ds-spd bench` of two commits, run alternately, as paired ratios (new / old).

Each commit is exported (`git archive`) to a temporary directory and benched from there with this checkout's
Python environment; the runs alternate (old, new, new, old, ...) so drift of the machine falls on both, and
pair k's ratio is new's median over old's median for every (configuration, path, workload) row of the
bench. Reported: the median ratio and a 95% t-interval of the geometric mean over the pairs
(ds_spd.tools.bench.paired_ratio); "no effect" where it contains 1.

    OMP_NUM_THREADS=1 python scripts/benchmarks/bench_commits.py --old a85686f^ --new HEAD --tp 2 --pairs 4 \
        --out docs/results/replication_cost/tp2
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from ds_spd.tools.bench import paired_ratio  # noqa: E402
from ds_spd.ports import free_port  # noqa: E402


def export(rev: str, into: str) -> tuple[str, str]:
    """The tree of ``rev`` under ``into``; returns (its directory, its full hash)."""
    sha = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
    path = os.path.join(into, sha[:10])
    os.makedirs(path)
    archive = subprocess.run(["git", "archive", sha], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", path], input=archive, check=True)
    return path, sha


def bench_once(tree: str, tp: int, bench_args: list[str], out: str) -> dict:
    """One `ds-spd bench` of the commit in ``tree`` on tp ranks (writing ``out``); its rows' medians by
    (config, comm, workload)."""
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1"}
    cmd = [deepspeed, "--num_gpus", str(tp), "--master_port", str(free_port()), "--module", "ds_spd",
           "bench", "--tp", str(tp), *bench_args, "--out", out]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"bench failed in {tree}:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "bench.json")) as f:
        result = json.load(f)
    return {f"{r['config']}|{r['comm']}|{r['workload']}": r["median_ms"] for r in result["rows"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", required=True)
    p.add_argument("--new", default="HEAD")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--bench-args", default="--fractions 0,1 --comm-paths auto --decode-batches 1 --repeats 3 "
                   "--decode-tokens 16 --prefill-len 256")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if os.path.exists(args.out) and os.listdir(args.out):
        raise SystemExit(f"--out {args.out!r} exists and is not empty")
    bench_args = shlex.split(args.bench_args)
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="ds_spd_ab_") as tmp:
        trees = {k: export(rev, os.path.join(tmp, k)) for k, rev in (("old", args.old), ("new", args.new))}
        order = [k for i in range(args.pairs) for k in (("old", "new") if i % 2 == 0 else ("new", "old"))]
        for n, which in enumerate(tqdm(order, desc=f"bench old/new alternately (tp {args.tp})")):
            runs[which].append(bench_once(trees[which][0], args.tp, bench_args, os.path.join(tmp, f"run{n}")))
    rows = {key: {"old_ms": [r[key] for r in runs["old"]], "new_ms": [r[key] for r in runs["new"]],
                  **paired_ratio([r[key] for r in runs["new"]], [r[key] for r in runs["old"]])}
            for key in runs["old"][0] if all(key in r for r in runs["new"])}
    command = "OMP_NUM_THREADS=1 python " + " ".join(shlex.quote(a) for a in sys.argv)
    result = {"old": {"rev": args.old, "sha": trees["old"][1]}, "new": {"rev": args.new, "sha": trees["new"][1]},
              "tp": args.tp, "pairs": args.pairs, "bench_args": bench_args, "rows": rows, "command": command}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_commits.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"# bench: {args.new} ({trees['new'][1][:10]}) / {args.old} ({trees['old'][1][:10]}), tp {args.tp}",
             "", f"`{command}`", "", f"{args.pairs} pairs, alternating; bench: `{' '.join(bench_args)}`", "",
             "| config | path | workload | old ms (medians) | new ms (medians) | new / old [95% CI] |", "|---|---|---|---|---|---|"]
    for key, r in rows.items():
        ci = r.get("ratio_ci95")
        lines.append("| " + " | ".join(key.split("|")) + f" | {', '.join(f'{x:.1f}' for x in r['old_ms'])} | "
                     f"{', '.join(f'{x:.1f}' for x in r['new_ms'])} | {r['ratio']:.3f}"
                     + (f" [{ci[0]:.3f}, {ci[1]:.3f}] {r['effect']}" if ci else "") + " |")
    with open(os.path.join(args.out, "bench_commits.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
