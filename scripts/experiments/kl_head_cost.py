"""The end-to-end KL stage's head cost: ``ds_spd.models.head.kl_to`` (the gradient computed with the loss, three
head passes a chunk) against the form it replaced (activation checkpointing: five), on random heads of SmolLM2's
and Gemma 3 270M's shapes, one thread, one micro-batch of 4 x 256 tokens; the same value and gradient checked,
seconds for loss and backward in interleaved rounds.

    python scripts/experiments/kl_head_cost.py [--rounds 3] [--out docs/results/kl_head_cost.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> None:
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from ds_spd.models import head
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = {}
    for name, d, vocab in (("SmolLM2-135M", 576, 49152), ("gemma-3-270m", 640, 262144)):
        model = torch.nn.Module()
        model.lm_head = torch.nn.Linear(d, vocab, bias=False).requires_grad_(False)
        model.config = SimpleNamespace(vocab_size=vocab, final_logit_softcapping=None)
        gen = torch.Generator().manual_seed(0)
        hidden, base = torch.randn(args.tokens, d, generator=gen), torch.randn(args.tokens, d, generator=gen)

        def checkpointed(h: torch.Tensor) -> torch.Tensor:
            def chunk_kl(h_part, b_part):
                with torch.no_grad():
                    target = F.log_softmax(head.head_logits(model, b_part), -1)
                return F.kl_div(F.log_softmax(head.head_logits(model, h_part), -1), target, log_target=True,
                                reduction="sum")
            return sum(checkpoint(chunk_kl, h[p], base[p], use_reentrant=False)
                       for p in head.token_chunks(h.shape[0], vocab)) / h.shape[0]

        def run(form) -> tuple[float, torch.Tensor, float]:
            h = hidden.clone().requires_grad_(True)
            start = time.perf_counter()
            loss = form(h)
            loss.backward()
            return loss.item(), h.grad, time.perf_counter() - start

        forms = {"checkpointed": checkpointed, "kl_to": lambda h: head.kl_to(model, h, base)}
        (v0, g0, _), (v1, g1, _) = run(forms["checkpointed"]), run(forms["kl_to"])
        seconds = {k: [] for k in forms}
        for r in range(args.rounds):
            for k in (forms if r % 2 == 0 else reversed(list(forms))):
                seconds[k].append(run(forms[k])[2])
        ratios = [a / b for a, b in zip(seconds["kl_to"], seconds["checkpointed"])]
        results[name] = {"tokens": args.tokens, "vocab": vocab, "same_value": abs(v0 - v1) <= 1e-6 * abs(v0),
                         "grad_max_abs_diff": (g0 - g1).abs().max().item(), "seconds": seconds,
                         "kl_to_over_checkpointed_median": statistics.median(ratios), "ratios": ratios}
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "seconds"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
