"""Perplexity ratio B / A of two `ds-spd eval --json` outputs on the same segments, with its paired 95% bootstrap
interval (ds_spd.tools.evaluation.paired_ratio_ci).

    python scripts/tools/paired_eval.py runs/bf16/eval_fp32.json runs/bf16/eval_bf16.json [--out ratio.json]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ds_spd.tools.evaluation import paired_ratio_ci  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", help="eval JSON of the reference")
    p.add_argument("b", help="eval JSON compared with it")
    p.add_argument("--out", help="write the comparison as JSON here")
    args = p.parse_args()
    a, b = (json.load(open(path)) for path in (args.a, args.b))
    result = {"a": args.a, "b": args.b, "perplexity_a": a["perplexity"], "perplexity_b": b["perplexity"],
              "tokens": a["tokens"], **paired_ratio_ci(a, b)}
    print(f"{args.b} / {args.a}: perplexity {b['perplexity']:.4f} / {a['perplexity']:.4f}, ratio {result['ratio']:.5f} "
          f"[{result['ci95'][0]:.5f}, {result['ci95'][1]:.5f}] ({result['verdict']}), {a['tokens']} tokens")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
