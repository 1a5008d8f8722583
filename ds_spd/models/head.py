"""Scores from the LM head, a chunk of tokens at a time.

Every score ds_spd computes is per token: log p(target) and top-1 (eval, the scan's perplexity), the KL to the
unmodified model (the scan's KL metric, the end-to-end KL stage). A model's forward makes fp32 logits of
``[tokens, vocab]`` for a whole batch at once; with Gemma 3's 262,144-token vocabulary that is 1 GiB for 4 x 256
tokens, and log-softmax makes another. So the model runs up to its final norm (its own forward, stopped before
the head) and the head is applied to at most :data:`LOGITS_BYTES` of logits at a time (Gemma 3 270M, 4 x 256
tokens: 9 chunks; SmolLM2's 49k vocabulary: 2). Measured: ``eval`` of Gemma 3 270M on 32 x 256 tokens peaks at
2.21 GiB instead of 3.84 GiB, at the same perplexity (docs/results/eval_memory).
"""
from __future__ import annotations

import copy
import functools
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

#: Most fp32 logits bytes one head call makes (``DS_SPD_LOGITS_MB`` overrides, in MiB). 128 MiB: 64 MiB saves
#: another 0.2 GB on Gemma 3 270M but costs 13% more time.
LOGITS_BYTES = int(float(os.environ.get("DS_SPD_LOGITS_MB", "128")) * 2**20)


def _hf(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)   # a DeepSpeed engine wraps the HF model


def final_hidden(model: nn.Module, **inputs) -> torch.Tensor:
    """The last hidden states, after the final norm: the HF model's own trunk (``model.model``) on ``inputs``
    (``input_ids`` or ``inputs_embeds``), without the head."""
    return _hf(model).model(**inputs, use_cache=False).last_hidden_state


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits of final hidden states: the head (in its own dtype, see :func:`head_in`) and, where the family
    has it, final soft-capping."""
    hf = _hf(model)
    logits = hf.lm_head(hidden.to(hf.lm_head.weight.dtype)).float()
    cap = getattr(hf.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@contextmanager
def head_in(model: nn.Module, dtype: torch.dtype | None) -> Iterator[nn.Module]:
    """The model with its head's matmul in ``dtype`` for the duration (a cast copy; the model's own head, tied
    or not, is untouched); the logits, log-softmax and everything after stay fp32. The scan ranks with it:
    with Gemma 3's 262k vocabulary the head is ~5/6 of a streamed fp32 scan, and in bf16 (where the hardware has
    bf16 units: :func:`faster_head_dtype`) the scan takes 0.70x the time with the same ranking up to near ties
    (docs/recovery.md, "Scan cost"). ``None``: the head as it is."""
    hf = _hf(model)
    own = hf.lm_head
    if dtype is None or own.weight.dtype == dtype:
        yield model
        return
    hf.lm_head = copy.deepcopy(own).to(dtype)
    try:
        yield model
    finally:
        hf.lm_head = own


def faster_head_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bf16 where its matmul is faster than fp32 here, else fp32: on GPUs and CPUs with bf16 units (AMX) the
    bf16 head took 0.70x the scan's time; on a CPU without them (AVX2: bf16 emulated) its matmul took 4.8x as
    long as fp32's and one Gemma 3 distilled-scan measurement (64 x 256 tokens) 388 s instead of 129 s
    (docs/recovery.md, "Scan cost"). Measured once per process on a head-sized product (256 tokens, hidden
    1024, 8192 vocabulary rows; 0.2 s on a CPU), whatever the model, so every scan of a process (and of a
    machine, away from the threshold) scores in the same dtype."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return _faster_cpu_dtype()


def dtype_choice(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """A dtype setting's value (the scan's head, the KL stage): ``auto`` is :func:`faster_head_dtype` on
    ``device``, any other name that torch dtype."""
    return faster_head_dtype(device) if name == "auto" else getattr(torch, name)


@functools.lru_cache(maxsize=1)
def _faster_cpu_dtype() -> torch.dtype:
    import time
    x, w = torch.randn(256, 1024), torch.randn(8192, 1024)
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = x.to(dtype), w.to(dtype)
        F.linear(a, b)   # warm-up
        start = time.perf_counter()
        F.linear(a, b)
        seconds[dtype] = time.perf_counter() - start
    return dtype_for(seconds)


def dtype_for(seconds: dict[torch.dtype, float]) -> torch.dtype:
    """The choice from a measurement: bf16 only where its product took under 0.8x fp32's time (a margin, so a
    machine near parity keeps fp32's precision)."""
    return torch.bfloat16 if seconds[torch.bfloat16] < 0.8 * seconds[torch.float32] else torch.float32


def token_chunks(n_tokens: int, vocab: int, budget: int | None = None) -> list[slice]:
    """Slices of ``n_tokens`` whose fp32 logits stay within ``budget`` bytes (default :data:`LOGITS_BYTES`; at
    least one token each)."""
    step = max(1, (budget or LOGITS_BYTES) // (4 * vocab))
    return [slice(a, min(a + step, n_tokens)) for a in range(0, n_tokens, step)]


@dataclass
class TokenScores:
    logprobs: torch.Tensor          # log p(target) per token, fp32, the shape of ``targets``
    top1: torch.Tensor              # argmax token per position
    kl_sum: float | None = None     # sum over tokens of KL(reference || model), when a reference was given


class Reference:
    """The unmodified model's next-token log-probs for one batch of final hidden states, chunk by chunk (the
    chunks of :func:`score_tokens`), computed on first use and, with ``keep``, kept: the streamed scan scores
    every measurement's stream of a batch against the same reference, so the head runs on it once instead of
    once per stream (Gemma 3 270M's KL scan: 20 head passes a batch instead of 38). Kept: tokens x vocab x 4
    bytes (Gemma 3, 4 x 255 tokens: 1.0 GiB)."""

    def __init__(self, model: nn.Module, hidden: torch.Tensor, keep: bool = True):
        self.model, self.hidden, self.keep = model, hidden.reshape(-1, hidden.shape[-1]), keep
        self._chunks: dict[tuple[int, int], torch.Tensor] = {}

    def log_probs(self, part: slice) -> torch.Tensor:
        key = (part.start, part.stop)
        if key not in self._chunks:
            lp = F.log_softmax(head_logits(self.model, self.hidden[part]), -1)
            if not self.keep:
                return lp
            self._chunks[key] = lp
        return self._chunks[key]


@torch.no_grad()
def score_tokens(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                 reference: Reference | torch.Tensor | None = None) -> TokenScores:
    """Per-token scores of final hidden states ``[..., d]`` against ``targets`` ``[...]``, chunk by chunk; with a
    ``reference`` (the unmodified model's final hidden states, or a :class:`Reference` of them), also the summed
    KL(p_reference || p_model)."""
    d = hidden.shape[-1]
    h, t = hidden.reshape(-1, d), targets.reshape(-1)
    ref = Reference(model, reference, keep=False) if isinstance(reference, torch.Tensor) else reference
    logprobs, top1, kl = torch.empty(t.shape, dtype=torch.float32), torch.empty(t.shape, dtype=torch.long), 0.0
    for part in token_chunks(t.numel(), _hf(model).config.vocab_size):
        logits = head_logits(model, h[part])
        lp = F.log_softmax(logits, -1)
        logprobs[part] = lp.gather(-1, t[part].unsqueeze(-1)).squeeze(-1).cpu()
        top1[part] = logits.argmax(-1).cpu()
        if ref is not None:
            kl += F.kl_div(lp, ref.log_probs(part), log_target=True, reduction="sum").item()
    return TokenScores(logprobs.view(targets.shape), top1.view(targets.shape), kl if ref is not None else None)


class _ChunkKL(torch.autograd.Function):
    """KL(p_base || p_model) summed over one chunk of tokens, its gradient for the chunk's hidden states computed
    in the forward (softmax of the model's logits minus p_base, back through the head) and kept ([tokens, d]): the
    head runs three times a chunk (base, model, gradient) where recomputing it in the backward ran it five, and no
    [tokens, vocab] tensor outlives the chunk."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, base: torch.Tensor, model: nn.Module) -> torch.Tensor:
        target = F.log_softmax(head_logits(model, base), -1)
        with torch.enable_grad():
            h = hidden.detach().requires_grad_(True)
            logits = head_logits(model, h)
        log_q = F.log_softmax(logits.detach(), -1)
        kl = F.kl_div(log_q, target, log_target=True, reduction="sum")
        d_logits = log_q.exp_().sub_(target.exp_())   # softmax(logits) - p_base, in place of the two
        (grad,) = torch.autograd.grad(logits, h, d_logits)
        ctx.save_for_backward(grad)
        return kl

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad_out * grad, None, None


def kl_to(model: nn.Module, hidden: torch.Tensor, base_hidden: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(p_base || p_model), differentiable in ``hidden``, chunk by chunk (:class:`_ChunkKL`: no
    [tokens, vocab] tensor outlives its chunk). The head's weights get no gradient (the KL stage freezes them)."""
    d = hidden.shape[-1]
    h, b = hidden.reshape(-1, d), base_hidden.reshape(-1, d).detach()
    total = sum(_ChunkKL.apply(h[part], b[part], model)
                for part in token_chunks(h.shape[0], _hf(model).config.vocab_size))
    return total / h.shape[0]
