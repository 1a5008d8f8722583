"""Run one step's plan on this rank: the same code on rank 0 and on every other rank (lockstep).

The model is the command's runner model (virtual TP, or the DeepSpeed AutoTP + SPD engine's module), called
like any HF causal LM with the slot cache, explicit position ids and masks, and ``logits_to_keep=1``: only
the last position of each row reaches the (vocabulary-sized) head, unless the plan's forward says ``keep=0``
(a prompt whose tokens are scored: ``echo`` with ``logprobs``), when every position does.

``compiled=True``: decode steps run through ``torch.compile`` (the all-reduce traced: DeepSpeed's shared-memory
op is a torch op; ds_spd.core.comm) with dynamic shapes, two graphs (one row, several rows) serving every step
(how they compile: ds_spd.serve.compile). :meth:`StepExecutor.warm_up`
compiles both before the first request, on every rank in the same order. Every prefill runs eagerly (a prompt
is compute-bound), and so would a step whose keys fill the whole context (a slice of the whole cache, a third
shape): a guard only, since the scheduler never feeds a context's last position (its token is sampled, not fed).
"""
from __future__ import annotations

import time

import torch

from ds_spd.serve.kv_cache import SlotCache
from ds_spd.serve.step import StepPlan


class StepExecutor:
    def __init__(self, model: torch.nn.Module, device: torch.device, slots: int, max_len: int, pool_slots: int = 0,
                 compiled: bool = False):
        config = model.config
        self.model, self.device = model, device
        self.compiled = None
        if compiled:
            from ds_spd.serve.compile import compile_decode   # imports inductor: only where it compiles
            self.compiled = compile_decode(self._decode, model)
        lagged = any(getattr(m, "spd", False) and getattr(m, "lag", False) for m in model.modules())
        self.cache = SlotCache(config.num_hidden_layers, slots, max_len, spare=pool_slots, lagged=lagged)
        self.layer_types = getattr(config, "layer_types", None)
        self.window = getattr(config, "sliding_window", None)
        self.fed: dict[str, list[int]] = {}   # tokens fed per sequence (kept only with a token log)
        self.log_tokens = False
        self.seconds: list[float] = []        # wall time of each forward of the last plan
        self.warm_up_seconds = 0.0            # compiling the decode graphs (warm_up)

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

    def _decode(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
                sliding: torch.Tensor | None = None) -> torch.Tensor:
        """The step a compiler traces: the masks as plain tensor arguments (a dict's entries would be guarded by
        subscript, which an ahead-of-time graph cannot keep: ds_spd.serve.compile)."""
        masks = mask if sliding is None else {"full_attention": mask, "sliding_attention": sliding}
        return self.model(input_ids=ids, position_ids=pos, attention_mask=masks, cache=self.cache, use_cache=True,
                          logits_to_keep=1).logits[:, -1]

    @torch.no_grad()
    def decode_compiled(self, offsets: list[int], tokens: list[list[int]]) -> torch.Tensor:
        """One token for rows ``0 ..`` through the compiled step; logits ``[B, V]``. Keys that would fill the
        whole context take the eager step (that slice would be a third graph, for one step per longest sequence)."""
        if max(offsets) + 1 >= self.cache.max_len:
            return self.forward(0, offsets, tokens)
        ids = torch.tensor(tokens, device=self.device)
        pos = self.cache.select_decode(offsets).to(self.device)
        mask = self._masks()
        masks = (mask["full_attention"], mask["sliding_attention"]) if isinstance(mask, dict) else (mask,)
        logits = self.compiled(ids, pos, *masks)
        if logits is None:   # inputs an ahead-of-time graph's guards refuse (ds_spd.serve.compile): the eager step
            return self.forward(0, offsets, tokens)
        stats = getattr(self.model, "spd_stats", None)
        if stats is not None:   # the compiled step does not count itself (a changing count would recompile it)
            stats.forwards += 1
        return logits

    def warm_up(self) -> float:
        """Compile the decode graphs (one row; several) before serving; seconds taken (0 when not compiling).

        Every rank calls it at the same point. The steps write one position of slots 0 and 1, which a sequence
        later placed there prefills before it reads (a slot's positions are read only up to its length)."""
        if self.compiled is None:
            return 0.0
        start = time.perf_counter()
        self.forward(0, [0], [[0]])               # the eager step allocates the cache: the graphs read it as it stays
        keys = min(self.cache.max_len - 1, 100)   # a size hint unlike any other dimension (no accidental equality)
        for rows in sorted({1, min(2, self.cache.slots)}):
            self.cache.last_pos[:rows] = [keys - 2] * rows   # a lagged block's state: as if each row ended there
            self.decode_compiled([keys - 1] * rows, [[0]] * rows)
        self.warm_up_seconds = time.perf_counter() - start
        return self.warm_up_seconds

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
