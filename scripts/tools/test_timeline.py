"""Where a `make test` run's wall time went, from its per-test records (``DS_SPD_TEST_CPU=FILE make test``,
tests/conftest.py): each pytest-xdist worker's test files in the order it ran them, when each worker finished, the
CPU seconds per file, and a Gantt chart (``--png``).

    DS_SPD_TEST_CPU=/tmp/cpu.jsonl make test
    python scripts/tools/test_timeline.py /tmp/cpu.jsonl --png /tmp/timeline.png
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", help="the JSON lines DS_SPD_TEST_CPU wrote")
    ap.add_argument("--png", help="draw the workers' files over time here")
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(args.records)]
    if not all("start" in r for r in rows):
        raise SystemExit(f"{args.records}: records without start times (written before tests/conftest.py kept them)")
    t0 = min(r["start"] for r in rows)
    files = defaultdict(lambda: {"start": float("inf"), "end": 0.0, "cpu": 0.0, "tests": 0})
    for r in rows:
        f = files[(r["worker"], r["test"].split("::")[0])]
        f["start"] = min(f["start"], r["start"] - t0)
        f["end"] = max(f["end"], r["start"] - t0 + r["wall"])
        f["cpu"] += r["cpu"]
        f["tests"] += 1
    workers = sorted({w for w, _ in files})
    end = max(f["end"] for f in files.values())
    print(f"{len(rows)} tests, {sum(r['cpu'] for r in rows):.0f} s of CPU (tests and the processes they waited for), "
          f"{end:.0f} s from the first test's start to the last one's end")
    for w in workers:
        mine = sorted(((k[1], v) for k, v in files.items() if k[0] == w), key=lambda kv: kv[1]["start"])
        busy = sum(v["end"] - v["start"] for _, v in mine)
        print(f"\n{w}: finished at {mine[-1][1]['end']:.0f} s, busy {busy:.0f} s")
        for name, v in mine:
            print(f"  {v['start']:6.0f} - {v['end']:6.0f} s  {v['cpu']:6.1f} s CPU  {v['tests']:3d}  {name}")
    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(11, 1 + 0.6 * len(workers)))
        for y, w in enumerate(workers):
            for (worker, name), v in files.items():
                if worker == w:
                    ax.barh(y, v["end"] - v["start"], left=v["start"], edgecolor="white")
                    if v["end"] - v["start"] > 0.04 * end:
                        ax.text(v["start"] + 1, y, name.split("/")[-1].removeprefix("test_").removesuffix(".py"),
                                va="center", fontsize=7)
        ax.set_yticks(range(len(workers)), workers)
        ax.set_xlabel("seconds since the first test started")
        ax.set_title("make test: each worker's test files over time")
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)


if __name__ == "__main__":
    main()
