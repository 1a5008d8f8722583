"""Prefix caching on rank 0: which cached KV a new prompt can start from, and which finished sequences to keep.

Every running sequence already holds its tokens' KV in its cache slot (ds_spd.serve.kv_cache). A finished one's
is copied into a *pool slot* (slots ``first .. first + slots - 1``, after the running batch's) instead of being
dropped, and the pool keeps the most recently used ones. At admission the scheduler asks :meth:`PrefixCache.best`
for the source (a live sequence's slot or a pool entry) whose cached tokens share the longest prefix with the new
prompt, token-exact; the plan copies that many positions into the new slot (a ``Move``) and only the rest is
prefilled. Decisions are made here, from token ids, and travel in the plan: every rank copies the same slots in
the same order (lockstep), and a copy made by one plan cannot be undone by a later eviction.

Two rules keep results exact (a position's KV depends only on the tokens up to it, so a copied prefix is the KV a
prefill would have written, up to the rounding of a different matmul shape, as with chunked prefill):

- at least the prompt's last token is prefilled again: its logits choose the first new token;
- a prompt whose tokens are scored (``echo`` with ``logprobs``) also takes the copied tokens' scores from the
  source, so the source must have been scored with as many alternatives, and the position before the first
  prefilled one must hold the same next token (the copy stops one token short of the common prefix).

Sliding-window layers (Gemma 3) need nothing more: the slot layout keeps every position of every layer and the
window is a mask, so a copied prefix is the same KV the window reads after a prefill.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import count

from ds_spd.serve.step import Move


def common_prefix(a: list[int], b: list[int]) -> int:
    """The number of leading tokens ``a`` and ``b`` share (list slices compare at C speed, 64 at a time)."""
    n, i = min(len(a), len(b)), 0
    while i + 64 <= n and a[i:i + 64] == b[i:i + 64]:
        i += 64
    while i < n and a[i] == b[i]:
        i += 1
    return i


def slot_bytes(layout, num_layers: int, virtual: bool, max_len: int, element_size: int, lagged: int = 0,
               hidden: int = 0) -> int:
    """Bytes one slot of the KV cache takes on the fullest rank: every layer's keys and values for ``max_len``
    positions of the rank's KV heads (ds_spd.core.layout.TPLayout: a rank's share, or its replicated head; a
    virtual TP process holds every rank's), and each of ``lagged`` blocks' state (a ``hidden``-sized vector a
    shard at every granule's end and at the slot's last position: ds_spd.serve.kv_cache)."""
    from ds_spd.serve.kv_cache import LAG_GRANULE
    heads = sum(layout.kv_heads) if virtual else max(layout.kv_heads)
    shards = len(layout.kv_heads) if virtual else 1
    kv = num_layers * 2 * heads * layout.head_dim * max_len
    return (kv + lagged * shards * hidden * (-(-max_len // LAG_GRANULE) + 1)) * element_size


def pool_slots(gb: float, one_slot: int) -> int:
    """Pool slots that fit ``gb`` GiB per rank."""
    return int(gb * 2**30 // one_slot)


@dataclass(eq=False)
class Source:
    """Cached KV a prompt can start from: ``tokens`` at positions ``0 ..`` of ``slot``; ``scores`` the tokens'
    log-probability reports (ds_spd.serve.scheduler.TokenLogprob, one per token from the first) and ``k`` the
    alternatives each holds, when the sequence was scored."""

    slot: int
    tokens: list[int]
    scores: list | None = None
    k: int = 0
    used: int = 0                  # the pool's clock at the last use (LRU)


@dataclass
class Hit:
    """What a new sequence reuses: ``length`` positions of ``source`` (0: nothing), and its scores when scored."""

    source: Source | None = None
    length: int = 0
    scores: list | None = None


def reusable(source: Source, prompt: list[int], scored: int | None, granule: int = 1) -> int:
    """Positions of ``source`` a prompt may copy: the shared prefix, leaving the prompt's last token to prefill;
    scored with ``scored`` alternatives: one short of the shared prefix, within the source's scores; rounded down
    to a multiple of ``granule`` (a model with lagged blocks: ds_spd.serve.kv_cache)."""
    shared = common_prefix(source.tokens, prompt)
    if scored is None:
        n = min(shared, len(prompt) - 1)
    elif source.scores is None or source.k < scored:
        return 0
    else:
        n = max(0, min(shared - 1, len(prompt) - 1, len(source.scores) - 1))
    return n - n % granule


@dataclass
class PrefixCache:
    """The pool's index (rank 0 only): up to ``slots`` finished sequences' KV in slots ``first ..``, least recently
    used evicted first; counters for /metrics."""

    first: int
    slots: int
    granule: int = 1               # a copy's length is a multiple of it (the slot cache's copy_granule)
    entries: list[Source] = field(default_factory=list)
    queried: int = 0               # prompt tokens admitted
    hits: int = 0                  # of them, copied instead of prefilled
    _clock: count = field(default_factory=count)

    def best(self, prompt: list[int], scored: int | None, live: list[Source]) -> Hit:
        """The source sharing the most reusable positions with ``prompt`` (live sequences first on a tie)."""
        hit = Hit()
        for src in (*live, *self.entries):
            n = reusable(src, prompt, scored, self.granule)
            if n > hit.length:
                hit = Hit(src, n, None if scored is None else _trim(src.scores[:n + 1], scored))
        if hit.source is not None and hit.source in self.entries:
            hit.source.used = next(self._clock)
        return hit

    def count(self, prompt_tokens: int, reused: int) -> None:
        self.queried += prompt_tokens
        self.hits += reused

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queried if self.queried else 0.0

    def keep(self, seq: Source) -> Move | None:
        """Keep a finished sequence's KV (``seq.slot``: its slot now) in the pool; the copy to make, or None when the
        pool already holds it, it cannot hold it, or it is too short to reuse."""
        if self.slots == 0 or len(seq.tokens) < 2:
            return None
        for e in self.entries:
            if _covers(e, seq):                       # already held: refresh it
                e.used = next(self._clock)
                return None
        old = next((e for e in self.entries if _covers(seq, e)), None)   # the new one extends an entry: replace it
        if old is None and len(self.entries) == self.slots:
            old = min(self.entries, key=lambda e: e.used)                 # evict the least recently used
        if old is not None:
            self.entries.remove(old)
            slot = old.slot
        else:
            taken = {e.slot for e in self.entries}
            slot = next(s for s in range(self.first, self.first + self.slots) if s not in taken)
        self.entries.append(Source(slot, seq.tokens, seq.scores, seq.k, next(self._clock)))
        return Move(seq.slot, slot, len(seq.tokens))


def _covers(a: Source, b: Source) -> bool:
    """``a`` serves every prompt ``b`` would: ``b``'s tokens are a prefix of ``a``'s and ``a``'s scores as good."""
    if len(a.tokens) < len(b.tokens) or a.tokens[:len(b.tokens)] != b.tokens:
        return False
    if b.scores is None:
        return True
    return a.scores is not None and a.k >= b.k and len(a.scores) >= len(b.scores)


def _trim(scores: list, k: int) -> list:
    """Score reports with at most ``k`` alternatives each (a source scored with more holds the top ones first)."""
    return [(tok, lp, alts[:k]) for tok, lp, alts in scores]
