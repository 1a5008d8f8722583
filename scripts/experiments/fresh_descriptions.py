"""A validation text of the unseen text's kind that no run has read: package descriptions (the METADATA bodies the
README path's unseen text is made of) of the installed packages that text does not use, ds_spd's own left out.
Each description contributes its opening paragraphs, up to ``--chars`` characters, in package-name order, so the
32 windows an eval reads span about twenty packages rather than one. The file is written once and kept in the
repository: the packages' versions are not all pinned, so it is not rebuilt elsewhere.

    python scripts/experiments/fresh_descriptions.py --out docs/results/input_chain/default_tp2/fresh_descriptions.txt
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def opening(body: str, limit: int) -> str:
    """The description's paragraphs from its start while they fit in ``limit`` characters (at least one)."""
    kept, size = [], 0
    for para in body.split("\n\n"):
        if kept and size + len(para) > limit:
            break
        kept.append(para)
        size += len(para) + 2
    return "\n\n".join(kept)


def main() -> None:
    from scripts.experiments.recovery_recipes import UNSEEN_PACKAGES
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--chars", type=int, default=1500, help="characters taken from each description, about")
    ap.add_argument("--min-length", type=int, default=2000, help="descriptions shorter than this are left out")
    args = ap.parse_args()
    if os.path.exists(args.out):
        sys.exit(f"{args.out} exists: not overwritten")
    norm = lambda name: name.lower().replace("_", "-")
    used = {norm(n) for n, _ in UNSEEN_PACKAGES} | {"ds-spd"}
    parts = {}
    for dist in md.distributions():
        name = norm(dist.metadata["Name"])
        body = (dist.read_text("METADATA") or "").split("\n\n", 1)
        if name not in used and len(body) == 2 and len(body[1]) > args.min_length:
            parts[name] = opening(body[1].strip(), args.chars)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n\n".join(parts[n] for n in sorted(parts)) + "\n")
    os.replace(tmp, args.out)
    print(f"{len(parts)} packages, {os.path.getsize(args.out)} bytes: {', '.join(sorted(parts)[:25])}, ...")


if __name__ == "__main__":
    main()
