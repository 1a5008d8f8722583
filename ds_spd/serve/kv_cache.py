"""A KV cache of fixed slots, one sequence per slot, for a batch whose sequences have different lengths.

HF's ``DynamicCache`` holds one batch whose rows all have the same length; continuous batching needs rows that
joined at different times. Here every layer holds ``[slots, kv_heads, max_len, head_dim]`` (kv_heads: this
rank's own, learnt from the first update), each sequence owns one slot and its own length, and a forward
covers the rows ``slot .. slot + B - 1`` with ``T`` new tokens each, written at every row's own offset. The
scheduler keeps the running sequences in slots ``0 .. B - 1`` (a finished one is replaced by the last: one
copy), so a batched decode reads a view of the cache, never a gathered copy. ``spare`` slots after those hold the
prefix cache's pool (ds_spd.serve.prefix_cache): never a forward's row, only copied from and to; their memory is
left untouched (not zeroed) until a copy writes it.

The attention mask is explicit (``[B, 1, T, kv_len]`` bool, one per layer type where a model has sliding
layers): key ``j`` is visible to query ``t`` of row ``b`` iff ``j <= offset_b + t`` (and within the window).
Masked positions get softmax weight exactly 0, so a row's result does not depend on the others' lengths.

A block with lagged attention (docs/method.md) reads the other ranks' attention output at the position before each
new token: the cache keeps it per slot and position (``[S, slots + spare, max_len, d]`` a lagged block, S the
shards a process holds), written and moved with the keys and values, so a decode step, a prefill chunk and a
cached prefix each start from the state their first position needs.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class SlotCache(Cache):
    """Per-slot KV storage, passed to an HF model as its ``cache``; :meth:`select` picks the rows of a forward."""

    def __init__(self, num_layers: int, slots: int, max_len: int, spare: int = 0):
        super().__init__(layers=[])
        self.num_layers, self.slots, self.max_len, self.spare = num_layers, slots, max_len, spare
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lag: dict[int, torch.Tensor] = {}   # lagged block -> the other ranks' attention output by position
        self._first, self._rows, self._pos, self._kv_len = 0, 0, None, 0

    # ---- the rows of the next forward
    def select(self, first_slot: int, offsets: list[int], q_len: int) -> torch.Tensor:
        """Rows ``first_slot ..`` with these offsets get ``q_len`` new tokens; returns their position ids ``[B, T]``."""
        if first_slot + len(offsets) > self.slots:
            raise ValueError(f"rows {first_slot}..{first_slot + len(offsets) - 1} exceed the {self.slots} slots")
        if max(offsets) + q_len > self.max_len:
            raise ValueError(f"{max(offsets) + q_len} tokens exceed the cache length {self.max_len}")
        pos = torch.tensor(offsets)[:, None] + torch.arange(q_len)[None, :]
        # one row: a plain slice write (what every layer's update does; no index tensors)
        return self._rows_at(first_slot, pos, max(offsets) + q_len,
                             (first_slot, offsets[0], offsets[0] + q_len) if len(offsets) == 1 else None)

    def select_decode(self, offsets: list[int]) -> torch.Tensor:
        """One new token for each of rows ``0 ..``, written by index even for one row (a compiled step's form: one
        graph whatever the rows' offsets); returns their position ids ``[B, 1]``."""
        if len(offsets) > self.slots or max(offsets) + 1 > self.max_len:
            raise ValueError(f"a decode step of {len(offsets)} sequences at up to {max(offsets)} tokens does not "
                             f"fit {self.slots} slots x {self.max_len}")
        return self._rows_at(0, torch.tensor(offsets)[:, None], max(offsets) + 1, None)

    def _rows_at(self, first_slot: int, pos: torch.Tensor, kv_len: int, one: tuple | None) -> torch.Tensor:
        """The next forward's rows: slots ``first_slot ..``, one per row of ``pos`` (their positions ``[B, T]``),
        keys up to ``kv_len``; ``one``: (slot, start, end) where a single row is written as a slice."""
        self._first, self._rows, self._pos, self._kv_len, self._one = first_slot, pos.shape[0], pos, kv_len, one
        self._rows_idx = torch.arange(first_slot, first_slot + pos.shape[0])[:, None].expand_as(pos)
        return pos

    def masks(self, layer_types: list[str] | None, sliding_window: int | None) -> torch.Tensor | dict:
        """The selected rows' attention mask; a dict by layer type where the model has sliding layers."""
        j = torch.arange(self._kv_len)[None, None, None, :]
        q = self._pos[:, None, :, None]
        full = j <= q
        if not layer_types or "sliding_attention" not in layer_types:
            return full
        return {"full_attention": full, "sliding_attention": full & (q - j < sliding_window)}

    # ---- the HF Cache interface the attention modules use
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.keys[layer_idx] is None:   # this rank's KV heads are known only now
            b, h, _, d = key_states.shape
            shape = (self.slots + self.spare, h, self.max_len, d)
            self.keys[layer_idx] = key_states.new_empty(shape)
            self.values[layer_idx] = value_states.new_empty(shape)
            # a batch reads every row up to its longest: masked, but a stale value must still be finite
            self.keys[layer_idx][:self.slots].zero_()
            self.values[layer_idx][:self.slots].zero_()
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self._one is not None:
            slot, start, end = self._one
            k[slot, :, start:end] = key_states[0]
            v[slot, :, start:end] = value_states[0]
        else:
            k[self._rows_idx, :, self._pos] = key_states.transpose(1, 2)
            v[self._rows_idx, :, self._pos] = value_states.transpose(1, 2)
        sl = slice(self._first, self._first + self._rows)
        return k[sl, :, :self._kv_len], v[sl, :, :self._kv_len]

    # ---- lagged attention's state (ds_spd.core.block)
    def lag_read(self, layer_idx: int) -> torch.Tensor | None:
        """Each selected row's state before its first new position, ``[S, B, 1, d]``: the stored output at the
        position before it, zero at a sequence's start (None: no lagged forward ran yet, every row starts)."""
        store = self.lag.get(layer_idx)
        if store is None:
            return None
        prev = (self._pos[:, 0] - 1).to(store.device)
        state = store[:, self._rows_idx[:, 0].to(store.device), prev.clamp(min=0)].unsqueeze(-2)
        return torch.where((prev >= 0)[None, :, None, None], state, torch.zeros_like(state))

    def lag_write(self, layer_idx: int, others: torch.Tensor) -> None:
        """Keep the other ranks' attention output (``[S, B, T, d]``) at the selected rows' new positions."""
        store = self.lag.get(layer_idx)
        if store is None:
            s, _, _, d = others.shape
            store = self.lag[layer_idx] = others.new_zeros((s, self.slots + self.spare, self.max_len, d))
        if self._one is not None:
            slot, start, end = self._one
            store[:, slot, start:end] = others[:, 0]
        else:
            store[:, self._rows_idx, self._pos] = others

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len - (0 if self._pos is None else self._pos.shape[1])

    # ---- slot moves the scheduler asks for
    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Slot ``dst`` takes slot ``src``'s first ``length`` positions (compaction, a cached prefix, the pool)."""
        for store in (self.keys, self.values):
            for t in store:
                if t is not None:
                    t[dst, :, :length] = t[src, :, :length]
        for t in self.lag.values():
            t[:, dst, :length] = t[:, src, :length]
