"""Next-token choice on rank 0 only: greedy at temperature 0, else temperature / top-k / top-p sampling.

No request can make the sampler fail: a temperature below :data:`GREEDY_BELOW` is greedy (as vLLM treats
it: dividing by it overflows), top-k and top-p always keep the best token, and non-finite logits are mapped
before any softmax (NaN never wins; if no logit is finite, :class:`SamplingError` fails that sequence only).

Every sequence has its own ``torch.Generator``: seeded from the request's ``seed`` and the choice index (so
``n`` > 1 choices differ and a seeded request gives the same tokens whatever else is in the batch), or
from fresh entropy without a seed. Other ranks never sample: they receive the chosen tokens in the next plan.
"""
from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import torch

#: temperatures below this are greedy (vLLM's _SAMPLING_EPS is 1e-5): logits / 1e-39 overflow to inf
GREEDY_BELOW = 1e-5


class SamplingError(RuntimeError):
    """This sequence cannot be sampled (its logits have no finite value): its request fails, the engine goes on."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0            # 0: all tokens
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (benchmarks)
    logprobs: int | None = None          # log-probabilities of the chosen tokens, with this many alternatives
    prompt_logprobs: int | None = None   # the same for the prompt's tokens (``echo``)
    presence_penalty: float = 0.0        # OpenAI: minus this for every token already in the output
    frequency_penalty: float = 0.0       # OpenAI: minus this times the token's count in the output
    repetition_penalty: float = 1.0      # vLLM / HF (CTRL): logits of prompt and output tokens / or * this
    logit_bias: tuple[tuple[int, float], ...] = ()   # OpenAI: (token id, added to its logit)
    min_tokens: int = 0                  # vLLM: no end-of-sequence before this many tokens

    def __post_init__(self):
        if self.temperature < GREEDY_BELOW:   # normalised where it enters: 1e-39 means greedy, not overflow
            object.__setattr__(self, "temperature", 0.0)

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


def adjust(logits: torch.Tensor, params: SamplingParams, output: list[int], prompt: list[int],
           eos_ids: set[int]) -> torch.Tensor:
    """The logits the sampler sees: penalties and bias applied, end-of-sequence barred before ``min_tokens``
    (the reported log-probabilities are the model's own, before any of this, as vLLM reports them)."""
    p = params
    if not (p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 or p.logit_bias
            or (p.min_tokens and len(output) < p.min_tokens and eos_ids)):
        return logits
    scores = logits.float().clone()
    if output and (p.presence_penalty or p.frequency_penalty):
        counts = torch.bincount(torch.tensor(output), minlength=scores.numel())[:scores.numel()].float()
        scores -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long)
        if seen.numel():
            picked = scores[seen]
            scores[seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
    for token, bias in p.logit_bias:
        if 0 <= token < scores.numel():
            scores[token] += bias
    if p.min_tokens and len(output) < p.min_tokens:
        scores[[t for t in eos_ids if 0 <= t < scores.numel()]] = float("-inf")
    return scores


def top_logprobs(logprobs: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of ``token`` and the ``k`` most likely tokens with theirs, from one row of
    log-probabilities (non-finite values reported as -inf, never NaN)."""
    lp = torch.nan_to_num(logprobs.float(), nan=float("-inf"))
    best = torch.topk(lp, min(k, lp.numel())) if k > 0 else None
    alternatives = [] if best is None else [(int(i), float(v)) for v, i in zip(best.values, best.indices)]
    return float(lp[token]), alternatives


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from one row of logits ``[vocab]``."""
    scores = logits.float()
    if not bool(torch.isfinite(scores).all()):   # NaN never wins; +inf is the largest finite value
        if not bool(torch.isfinite(scores).any()):
            raise SamplingError("the model produced no finite logit for this sequence")
        scores = torch.nan_to_num(scores, nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
    if params.greedy:
        return int(scores.argmax())
    scores = scores / params.temperature
    if not bool(torch.isfinite(scores.max())):   # the division overflowed: the best token is all that is left
        return int(scores.argmax())
    keep = torch.ones_like(scores, dtype=torch.bool)
    if 0 < params.top_k < scores.numel():
        keep &= scores >= torch.topk(scores, params.top_k).values[-1]
    if params.top_p < 1.0:   # the smallest prefix (best first) whose probability reaches top_p; never empty
        sorted_scores, order = scores.masked_fill(~keep, float("-inf")).sort(descending=True)
        probs = sorted_scores.softmax(-1)
        inside = probs.cumsum(-1) - probs < params.top_p
        inside[0] = True
        keep[order[~inside]] = False
    probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
