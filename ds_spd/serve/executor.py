"""Run one step's plan on this rank: the same code on rank 0 and on every other rank (lockstep).

The model is the command's runner model (virtual TP, or the DeepSpeed AutoTP + SPD engine's module), called
like any HF causal LM with the slot cache, explicit position ids and masks, and ``logits_to_keep=1``: only
the last position of each row reaches the (vocabulary-sized) head, unless the plan's forward says ``keep=0``
(a prompt whose tokens are scored: ``echo`` with ``logprobs``), when every position does.

``compiled=True``: decode steps run through ``torch.compile`` (the all-reduce traced: DeepSpeed's shared-memory
op is a torch op; ds_spd.core.comm), their shapes padded to buckets (rows to a power of two up to the slots, keys
to a power of two from :data:`MIN_KEYS` up to the context), so one graph per bucket serves every step of that
size; each rank compiles the same graphs in the same order, since every rank runs the same plans. Prefill stays
eager (a prompt's length varies; it is compute-bound).
"""
from __future__ import annotations

import time

import torch

from ds_spd.serve.kv_cache import SlotCache
from ds_spd.serve.step import StepPlan


#: the smallest key bucket of a compiled decode step
MIN_KEYS = 256


def bucket(n: int, limit: int, floor: int = 1) -> int:
    """The next power of two >= ``n`` (at least ``floor``), at most ``limit``."""
    b = floor
    while b < n:
        b *= 2
    return min(b, limit)


class StepExecutor:
    def __init__(self, model: torch.nn.Module, device: torch.device, slots: int, max_len: int, pool_slots: int = 0,
                 compiled: bool = False):
        config = model.config
        self.model, self.device = model, device
        self.compiled = None
        if compiled:
            import torch._dynamo.config as dynamo
            # one graph per (rows, keys) bucket: up to log2(slots) x log2(context / MIN_KEYS) of them
            dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
            self.compiled = torch.compile(self._decode, dynamic=False)
        self.cache = SlotCache(config.num_hidden_layers, slots, max_len, spare=pool_slots)
        self.layer_types = getattr(config, "layer_types", None)
        self.window = getattr(config, "sliding_window", None)
        self.fed: dict[str, list[int]] = {}   # tokens fed per sequence (kept only with a token log)
        self.log_tokens = False
        self.seconds: list[float] = []        # wall time of each forward of the last plan

    @torch.no_grad()
    def forward(self, first_slot: int, offsets: list[int], tokens: list[list[int]], keep: int = 1) -> torch.Tensor:
        """Rows ``first_slot ..`` (offsets: their cached lengths) take ``tokens``; last-position logits ``[B, V]``
        (``keep=0``: every position's, ``[B, T, V]``)."""
        ids = torch.tensor(tokens, device=self.device)
        pos = self.cache.select(first_slot, offsets, ids.shape[1]).to(self.device)
        out = self.model(input_ids=ids, position_ids=pos, attention_mask=self._masks(), cache=self.cache,
                         use_cache=True, logits_to_keep=keep)
        return out.logits if keep == 0 else out.logits[:, -1]

    def _masks(self) -> torch.Tensor | dict:
        """The selected rows' attention mask(s) on the model's device."""
        mask = self.cache.masks(self.layer_types, self.window)
        return {k: m.to(self.device) for k, m in mask.items()} if isinstance(mask, dict) else mask.to(self.device)

    def _decode(self, ids: torch.Tensor, pos: torch.Tensor, mask) -> torch.Tensor:
        return self.model(input_ids=ids, position_ids=pos, attention_mask=mask, cache=self.cache, use_cache=True,
                          logits_to_keep=1).logits[:, -1]

    @torch.no_grad()
    def decode_compiled(self, offsets: list[int], tokens: list[list[int]]) -> torch.Tensor:
        """One token for rows ``0 ..`` through the compiled step, padded to its bucket; logits ``[B, V]``."""
        rows = bucket(len(offsets), self.cache.slots)
        keys = bucket(max(offsets) + 1, self.cache.max_len, MIN_KEYS)
        ids = torch.tensor([t[0] for t in tokens] + [0] * (rows - len(tokens)), device=self.device)[:, None]
        pos = self.cache.select_padded(offsets, rows, keys).to(self.device)
        mask = self._masks()
        stats = getattr(self.model, "spd_stats", None)
        if stats is not None:   # the compiled step does not count itself (a changing count would recompile it)
            stats.forwards += 1
        return self.compiled(ids, pos, mask)[:len(offsets)]

    def run(self, plan: StepPlan) -> list[torch.Tensor]:
        """Apply a plan (slot moves, then forwards); the logits of each forward, for rank 0 to sample from."""
        for move in plan.moves:
            self.cache.copy_slot(move.src, move.dst, move.length)
        out, self.seconds = [], []
        for fwd in plan.forwards:
            start = time.perf_counter()
            if self.compiled is not None and fwd.kind == "decode":
                out.append(self.decode_compiled(fwd.offsets, fwd.tokens))
            else:
                out.append(self.forward(fwd.slot, fwd.offsets, fwd.tokens, fwd.keep))
            self.seconds.append(time.perf_counter() - start)
            if self.log_tokens:
                for sid, toks in zip(fwd.seqs, fwd.tokens):
                    self.fed.setdefault(sid, []).extend(toks)
        return out
