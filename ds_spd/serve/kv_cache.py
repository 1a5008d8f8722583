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
new token (a hidden-sized vector a shard: more than a rank's keys and values of a position). The cache keeps it
where a forward can start: at each slot's last written position (a decode step, the next prefill chunk, a slot
moved whole) and at the last position of every ``LAG_GRANULE`` positions (a copied prefix or a choice's fork, whose
length the scheduler rounds down to the granule for such a model: ``copy_granule``), so a slot holds 1/16 of the
per-position state. A forward that starts anywhere else is refused (an error, never a wrong state).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache

#: a lagged block's state is kept at the end of every LAG_GRANULE positions (and at each slot's last position)
LAG_GRANULE = 16


class SlotCache(Cache):
    """Per-slot KV storage, passed to an HF model as its ``cache``; :meth:`select` picks the rows of a forward."""

    def __init__(self, num_layers: int, slots: int, max_len: int, spare: int = 0, lagged: bool = False):
        super().__init__(layers=[])
        self.lagged = lagged   # the model has lagged blocks: forwards start only where their state is kept
        self.num_layers, self.slots, self.max_len, self.spare = num_layers, slots, max_len, spare
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        # lagged block -> (the other ranks' attention output at each granule's last position, at each slot's last)
        self.lag: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.last_pos = [-1] * (slots + spare)   # each slot's last written position (-1: none or unknown)
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
        if self.lagged:
            self._lag_from(first_slot, pos)
        return pos

    def _lag_from(self, first_slot: int, pos: torch.Tensor) -> None:
        """Where each row's lagged state comes from (its slot's last position, or a granule's end) before this
        forward writes, and each slot's last position after it."""
        starts, last = pos[:, 0].tolist(), pos[:, -1].tolist()
        from_last = [s == 0 or self.last_pos[first_slot + b] == s - 1 for b, s in enumerate(starts)]
        for b, (start, ok) in enumerate(zip(starts, from_last)):
            if not ok and start % LAG_GRANULE:
                raise ValueError(f"slot {first_slot + b} starts at position {start}: a lagged block's state is kept "
                                 f"only at its last position ({self.last_pos[first_slot + b]}) and at every "
                                 f"{LAG_GRANULE}th (copies must be rounded to copy_granule)")
        self._lag_last = torch.tensor(from_last)
        self._lag_cell = (pos[:, 0] // LAG_GRANULE - 1).clamp(min=0)
        for b, p in enumerate(last):
            self.last_pos[first_slot + b] = p

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
        """Each selected row's state before its first new position, ``[S, B, 1, d]``: its slot's last or a granule's
        end, zero at a sequence's start (None: no lagged forward ran yet, every row starts)."""
        if layer_idx not in self.lag:
            return None
        cells, last = self.lag[layer_idx]
        rows = self._rows_idx[:, 0].to(cells.device)
        state = torch.where(self._lag_last.to(cells.device)[None, :, None], last[:, rows],
                            cells[:, rows, self._lag_cell.to(cells.device)])
        state = torch.where((self._pos[:, 0] > 0).to(cells.device)[None, :, None], state, torch.zeros_like(state))
        return state.unsqueeze(-2)

    def lag_write(self, layer_idx: int, others: torch.Tensor) -> None:
        """Keep the other ranks' attention output (``[S, B, T, d]``) at the selected rows' last new position and at
        every granule's end among the new positions."""
        if layer_idx not in self.lag:
            s, _, _, d = others.shape
            n = self.slots + self.spare
            self.lag[layer_idx] = (others.new_zeros((s, n, -(-self.max_len // LAG_GRANULE), d)),
                                   others.new_zeros((s, n, d)))
        cells, last = self.lag[layer_idx]
        rows = self._rows_idx[:, 0]
        last[:, rows] = others[:, :, -1]
        if others.shape[2] == 1:   # one position a row (decode; a compiled step's form): a granule's end or not
            pos = self._pos[:, 0].to(cells.device)
            at = (rows.to(cells.device), pos // LAG_GRANULE)
            cells[:, at[0], at[1]] = torch.where((pos % LAG_GRANULE == LAG_GRANULE - 1)[None, :, None],
                                                 others[:, :, 0], cells[:, at[0], at[1]])
            return
        for b in range(self._rows):   # several positions (a prefill): the granule ends among them
            start = int(self._pos[b, 0])
            ends = list(range(start + (-start - 1) % LAG_GRANULE, start + others.shape[2], LAG_GRANULE))
            if ends:
                cells[:, self._first + b, [p // LAG_GRANULE for p in ends]] = others[:, b, [p - start for p in ends]]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len - (0 if self._pos is None else self._pos.shape[1])

    # ---- slot moves the scheduler asks for
    @property
    def copy_granule(self) -> int:
        """What a copied prefix's length must be a multiple of (the scheduler rounds down to it)."""
        return LAG_GRANULE if self.lagged else 1

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Slot ``dst`` takes slot ``src``'s first ``length`` positions (compaction, a cached prefix, the pool)."""
        for store in (self.keys, self.values):
            for t in store:
                if t is not None:
                    t[dst, :, :length] = t[src, :, :length]
        for cells, last in self.lag.values():
            cells[:, dst, :length // LAG_GRANULE] = cells[:, src, :length // LAG_GRANULE]
            last[:, dst] = last[:, src]
        self.last_pos[dst] = length - 1 if self.last_pos[src] == length - 1 else -1
