"""Calibration text the model writes itself (LLM-QAT's data-free distillation): each sequence starts from a random
vocabulary token and continues by sampling the model's own distribution (temperature 1), so distillation sees
what the model produces on any subject rather than two shipped corpora. Sequences are separated by blank lines;
the token windows distill draws (``--text FILE``) then mostly fall inside one sequence.

    python scripts/experiments/self_generated_text.py --model default --sequences 160 --tokens 256 --out FILE
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--sequences", type=int, default=160)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if os.path.exists(args.out):
        sys.exit(f"{args.out} exists: not overwritten")
    import torch
    from tqdm import tqdm

    from ds_spd.models.loading import load_model
    model, tok = load_model(args.model)
    gen = torch.Generator().manual_seed(args.seed)
    special = set(tok.all_special_ids)
    texts, start = [], time.perf_counter()
    for first in tqdm(range(0, args.sequences, args.batch), desc="generating"):
        n = min(args.batch, args.sequences - first)
        starts = [t for t in torch.randint(0, len(tok), (4 * n,), generator=gen).tolist() if t not in special][:n]
        torch.manual_seed(args.seed + first)
        with torch.no_grad():
            out = model.generate(torch.tensor(starts)[:, None], attention_mask=torch.ones(n, 1, dtype=torch.long),
                                 do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.tokens,
                                 min_new_tokens=args.tokens, pad_token_id=tok.eos_token_id)
        texts += [tok.decode(row, skip_special_tokens=True).strip() for row in out]
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n\n".join(texts) + "\n")
    os.replace(tmp, args.out)
    print(f"{len(texts)} sequences, {os.path.getsize(args.out)} bytes in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
