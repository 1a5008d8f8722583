"""Compare `ds-spd bench` runs within one host and across (simulated) hosts: all-reduce cost and SPD saving.

    python scripts/benchmarks/multihost_table.py --one-host runs/bench_onehost/bench.json \\
        --two-hosts runs/bench_twohosts/bench.json --out docs/results/multihost

Each bench.json must hold the spd0 and spd100 rows of its paths; writes multihost.json and multihost.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ds_spd.outputs import MD_MARK, write_atomic, write_json  # noqa: E402


def rows_of(path: str, label: str) -> list[dict]:
    with open(path) as f:
        bench = json.load(f)
    by = {(r["config"], r["comm"], r["workload"]): r for r in bench["rows"]}
    out = []
    for (config, comm, workload), r in sorted(by.items()):
        if config != "spd0":
            continue
        full = by.get(("spd100", comm, workload))
        if full is None:
            continue
        out.append({"setting": label, "path": comm, "workload": workload,
                    "allreduce_ms_per_forward_0": r.get("allreduce_ms_per_forward"),
                    "allreduce_ms_per_forward_100": full.get("allreduce_ms_per_forward"),
                    "ms_0": r["median_ms"], "ms_100": full["median_ms"],
                    "saving": 1 - full["median_ms"] / r["median_ms"], "command": bench.get("command")})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--one-host", required=True)
    p.add_argument("--two-hosts", required=True)
    p.add_argument("--out", default="docs/results/multihost")
    args = p.parse_args()
    rows = rows_of(args.one_host, "one host") + rows_of(args.two_hosts, "two hosts (simulated)")
    write_json(os.path.join(args.out, "multihost.json"), {"rows": rows}, "multihost/1")
    lines = [MD_MARK, "| setting | all-reduce path | workload | all-reduce ms / fwd, 0% → 100% SPD | "
             "latency ms, 0% → 100% SPD | saving |", "|---" * 6 + "|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['path']} | {r['workload']} | {r['allreduce_ms_per_forward_0']:.2f} → "
                     f"{r['allreduce_ms_per_forward_100']:.2f} | {r['ms_0']:.2f} → {r['ms_100']:.2f} | "
                     f"{100 * r['saving']:.1f}% |")
    write_atomic(os.path.join(args.out, "multihost.md"), "\n".join(lines) + "\n")
    print("\n".join(lines[1:]))


if __name__ == "__main__":
    main()
