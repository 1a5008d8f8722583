"""Next-token choice on rank 0 only: greedy at temperature 0, else temperature / top-k / top-p sampling.

Every sequence has its own ``torch.Generator``: seeded from the request's ``seed`` and the choice index (so
``n`` > 1 choices differ and a seeded request gives the same tokens whatever else is in the batch), or
from fresh entropy without a seed. Other ranks never sample: they receive the chosen tokens in the next plan.
"""
from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0            # 0: all tokens
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (benchmarks)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def generator_for(seed: int | None, index: int) -> torch.Generator:
    """The generator of choice ``index`` of a request: a stable function of (seed, index), or fresh entropy."""
    if seed is None:
        value = secrets.randbits(63)
    else:   # not Python's salted hash(): the same seed gives the same stream in every process and run
        value = int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little") >> 1
    return torch.Generator().manual_seed(value)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from one row of logits ``[vocab]``."""
    if params.greedy:
        return int(logits.argmax())
    scores = logits.float() / params.temperature
    if 0 < params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = scores.sort(descending=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum - sorted_scores.softmax(-1) >= params.top_p   # keep the smallest prefix reaching top_p
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
