"""Continuous batching on rank 0: which sequences run in the next step, and what happens to their tokens.

Each step is one plan (ds_spd.serve.step.StepPlan), sent to every rank and run by each (ds_spd.serve.executor):

- ``moves``: slot copies that keep the running sequences in slots ``0 .. R-1`` (a finished sequence's slot is
  filled by the last running one) and the prefilling ones right after them;
- ``forwards``: one decode forward over every running sequence (one token each), then prefill forwards
  (one sequence each) for as many queued prompts as the step's token budget leaves room for: a prompt
  longer than what is left is split across steps (chunked prefill), so a long prompt never stalls the
  running decodes for more than ``max_step_tokens`` tokens of work;
- ``done``: sequences that left since the last plan (finished, stopped, or cancelled by their client).

Requests wait in a FIFO queue while ``max_seqs`` sequences hold slots. Rank 0 samples the next tokens
(:mod:`ds_spd.serve.sampling`), detokenises incrementally, and finishes a sequence on an end-of-sequence
token, a stop string or ``max_tokens``. A request with ``n`` > 1 is ``n`` sequences sharing one prompt list: the
first is prefilled, the others copy its prompt's cache (all but the last position, which each prefills itself to
get its first logits). With a prefix cache (ds_spd.serve.prefix_cache), any new sequence starts from the longest
token-exact prefix another request's sequence has cached, running or finished.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ds_spd.serve.prefix_cache import Hit, PrefixCache, Source, common_prefix
from ds_spd.serve.sampling import SamplingParams, adjust, generator_for, sample, top_logprobs
from ds_spd.serve.step import Forward, Move, StepPlan

#: a sequence waits a step for a prompt being prefilled when that saves at least this many prefill tokens (or all
#: it could save): a shared chat-template header alone is not worth a step
MIN_WAIT_GAIN = 16

#: one token's log-probability report: (token id, its log-probability or None for a prompt's first token,
#: [(alternative token id, log-probability)], best first)
TokenLogprob = tuple[int, "float | None", list[tuple[int, float]]]


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator = None
    output: list[int] = field(default_factory=list)
    offset: int = 0                  # tokens in the cache
    slot: int = -1
    finish_reason: str | None = None
    text: str = ""                   # the output text so far, cut before any stop string
    sent: int = 0                    # characters of ``text`` already delivered
    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    prompt_logprobs: list | None = None   # TokenLogprob per prompt token, with ``params.prompt_logprobs``
    cached: int = 0                  # prompt tokens copied from a cached prefix instead of prefilled

    def __post_init__(self):
        if self.generator is None:
            self.generator = generator_for(self.params.seed, self.index)

    @property
    def id(self) -> str:
        return f"{self.request_id}/{self.index}"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilled(self) -> bool:
        return self.offset >= len(self.prompt)

    def source(self) -> Source:
        """What this sequence has cached, as a prefix source: the tokens fed so far, and their scores if scored."""
        scored = self.params.prompt_logprobs
        return Source(self.slot, (self.prompt + self.output)[:self.offset],
                      self.prompt_logprobs if scored is not None else None, scored or 0)


@dataclass
class Event:
    """What a step did for one sequence: new text (possibly empty) and, at the end, its finish reason."""

    seq: Sequence
    delta: str
    token_ids: list[int]
    error: str | None = None   # this sequence failed (its request fails; the engine and the others go on)
    logprobs: list[TokenLogprob] | None = None          # of ``token_ids``, with ``params.logprobs``
    prompt_logprobs: list[TokenLogprob] | None = None   # with the first token, with ``params.prompt_logprobs``


class Scheduler:
    """``prefix_cache``: reuse prefixes across requests (its pool keeps finished sequences); None: only the ``n``
    choices of one prompt share its prefill. ``granule``: a copied prefix's length is a multiple of it (the slot
    cache's ``copy_granule``: 16 for a model with lagged blocks, 1 otherwise)."""

    def __init__(self, tokenizer, eos_ids: set[int], max_seqs: int, max_len: int, max_step_tokens: int,
                 prefix_cache: PrefixCache | None = None, granule: int = 1):
        if max_step_tokens <= max_seqs:
            raise ValueError(f"max_step_tokens ({max_step_tokens}) must exceed max_seqs ({max_seqs}): every step "
                             "decodes one token per running sequence and needs room left for a prefill")
        self.tokenizer, self.eos_ids = tokenizer, set(eos_ids)
        self.max_seqs, self.max_len, self.max_step_tokens = max_seqs, max_len, max_step_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []       # slots 0 .. R-1, in slot order
        self.prefilling: list[Sequence] = []    # slots R .., in slot order; at most the last is part-filled
        self._done: list[str] = []
        self.across = prefix_cache is not None
        self.cache = prefix_cache if prefix_cache is not None else PrefixCache(max_seqs, 0)
        self.cache.granule = granule

    # ---- requests in and out
    def add(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            if len(s.prompt) + s.params.max_tokens > self.max_len:
                raise ValueError(f"{len(s.prompt)} prompt + {s.params.max_tokens} new tokens exceed {self.max_len}")
            self.waiting.append(s)

    def cancel(self, request_id: str) -> list[Sequence]:
        """Finish a request's sequences (its client went away); their slots are freed by the next plan."""
        hit = [s for s in (*self.waiting, *self.running, *self.prefilling) if s.request_id == request_id]
        for s in hit:
            s.finish_reason = s.finish_reason or "cancelled"
        self.waiting = deque(s for s in self.waiting if not s.finished)
        self._done += [s.id for s in hit]
        return hit

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    # ---- the next step
    def plan(self) -> StepPlan | None:
        """The next step's plan, or None if there is nothing to run."""
        moves = self._compact()
        forwards = []
        if self.running:
            forwards.append(Forward("decode", 0, [s.offset for s in self.running], [[s.output[-1]] for s in self.running],
                                    [s.id for s in self.running]))
        budget, complete = self.max_step_tokens - len(self.running), True
        for s in self.prefilling:   # at most one: a prompt part-filled in an earlier step goes on first
            budget, complete = self._prefill_chunk(s, budget, forwards)
        while complete and budget > 0 and self.waiting and len(self.running) + len(self.prefilling) < self.max_seqs:
            s = self.waiting[0]
            hit = self._hit(s)
            if self._worth_waiting(s, hit):
                break   # a prompt being prefilled will hold more of this one: start from it next step
            self.waiting.popleft()
            s.slot = len(self.running) + len(self.prefilling)
            self.prefilling.append(s)
            if hit.length:   # copy the cached prefix; prefill the rest
                moves.append(Move(hit.source.slot, s.slot, hit.length))
                s.offset = s.cached = hit.length
                s.prompt_logprobs = hit.scores
            self.cache.count(len(s.prompt), hit.length)
            budget, complete = self._prefill_chunk(s, budget, forwards)
        done, self._done = self._done, []
        if not forwards and not moves and not done:
            return None
        return StepPlan(moves, forwards, done)

    def _shares(self, t: Sequence, s: Sequence) -> bool:
        return self.across or t.prompt is s.prompt

    def _hit(self, s: Sequence) -> Hit:
        """The longest prefix of ``s``'s prompt cached by a live sequence or the pool."""
        live = [t.source() for t in (*self.running, *self.prefilling) if t.offset > 0 and self._shares(t, s)]
        return self.cache.best(s.prompt, s.params.prompt_logprobs, live)

    def _worth_waiting(self, s: Sequence, hit: Hit) -> bool:
        """Whether a sequence being prefilled will, once prefilled, give ``s`` enough more than ``hit``."""
        scored = s.params.prompt_logprobs
        most = len(s.prompt) - 1   # the last prompt token is always prefilled
        for t in self.prefilling:
            k = t.params.prompt_logprobs
            if not self._shares(t, s) or (scored is not None and (k is None or k < scored)):
                continue
            reuse = min(common_prefix(t.prompt, s.prompt) - (scored is not None), most)
            gain = reuse - reuse % self.cache.granule - hit.length
            if gain > 0 and gain >= min(MIN_WAIT_GAIN, most - hit.length):
                return True
        return False

    def _prefill_chunk(self, s: Sequence, budget: int, forwards: list) -> tuple[int, bool]:
        """Add up to ``budget`` of ``s``'s prompt tokens; returns the budget left and whether the prompt is in."""
        n = min(len(s.prompt) - s.offset, budget)
        if n > 0:
            scored = s.params.prompt_logprobs is not None and len(s.prompt_logprobs or ()) < len(s.prompt)
            # a prompt being scored keeps every position's logits (every rank runs the same head)
            forwards.append(Forward("prefill", s.slot, [s.offset], [s.prompt[s.offset:s.offset + n]], [s.id],
                                    keep=0 if scored else 1))
        return budget - n, s.offset + n == len(s.prompt)

    def _compact(self) -> list[Move]:
        """Drop finished sequences (the pool keeps their KV first); move the last running ones into the holes, then
        the prefilling ones after."""
        moves = []
        for s in (*self.running, *self.prefilling):
            if s.finished:
                if s.id not in self._done:
                    self._done.append(s.id)
                if self.across and s.finish_reason != "error":
                    moves += filter(None, [self.cache.keep(s.source())])
        self.running = [s for s in self.running if not s.finished]
        self.prefilling = [s for s in self.prefilling if not s.finished]
        r = len(self.running)
        holes = sorted(set(range(r)) - {s.slot for s in self.running})
        outside = [s for s in self.running if s.slot >= r]
        for hole, s in zip(holes, outside):
            moves.append(Move(s.slot, hole, s.offset))
            s.slot = hole
        self.running.sort(key=lambda s: s.slot)
        for i, s in enumerate(self.prefilling):
            if s.slot != r + i:
                moves.append(Move(s.slot, r + i, s.offset))
                s.slot = r + i
        return moves

    # ---- after the step: sample, detokenise, finish
    def complete(self, plan: StepPlan, logits: list[torch.Tensor]) -> list[Event]:
        """Apply a step's results: ``logits[i]`` holds the last position's logits of forward i's rows."""
        by_id = {s.id: s for s in (*self.running, *self.prefilling)}
        events, now = [], time.monotonic()
        for fwd, rows in zip(plan.forwards, logits):
            for sid, toks, row in zip(fwd.seqs, fwd.tokens, rows):
                s = by_id[sid]
                start, s.offset = s.offset, s.offset + len(toks)
                if row.dim() == 2:   # every position kept: score the prompt tokens they predict
                    self._score_prompt(s, start, row)
                    row = row[-1]
                if s.finished or not s.prefilled:
                    continue
                try:   # whatever one sequence does (its logits, its text), the step goes on for the others
                    token = sample(adjust(row, s.params, s.output, s.prompt, self.eos_ids), s.params, s.generator)
                    s.output.append(token)
                    s.first_token = s.first_token or now
                    event = self._advance(s, token)
                    if s.params.logprobs is not None:
                        event.logprobs = [(token, *top_logprobs(row.float().log_softmax(-1), token, s.params.logprobs))]
                    if len(s.output) == 1:
                        event.prompt_logprobs = s.prompt_logprobs
                    events.append(event)
                except Exception as err:   # noqa: BLE001  (a failure of this sequence only)
                    s.finish_reason = "error"
                    events.append(Event(s, "", [], f"{type(err).__name__}: {err}"))
        newly = [s for s in self.prefilling if s.prefilled]
        self.prefilling = [s for s in self.prefilling if not s.prefilled]
        self.running += newly
        return events

    @staticmethod
    def _score_prompt(s: Sequence, start: int, row: torch.Tensor) -> None:
        """Prompt log-probabilities from a chunk's logits ``[T, V]`` (positions ``start ..``): position j scores
        prompt token j + 1; the prompt's first token has none (None, as OpenAI and vLLM report it)."""
        if s.params.prompt_logprobs is None:
            return
        if s.prompt_logprobs is None:
            s.prompt_logprobs = [(s.prompt[0], None, [])]
        logprobs = row.float().log_softmax(-1)
        for j in range(row.shape[0]):
            target = start + j + 1
            if target < len(s.prompt):
                s.prompt_logprobs.append((s.prompt[target],
                                          *top_logprobs(logprobs[j], s.prompt[target], s.params.prompt_logprobs)))

    def _advance(self, s: Sequence, token: int) -> Event:
        if token in self.eos_ids and not s.params.ignore_eos:
            s.finish_reason = "stop"
        ids = s.output[:-1] if s.finish_reason == "stop" else s.output
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if not s.finished:
            cut = min((i for i in (text.find(stop) for stop in s.params.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, s.finish_reason = text[:cut], "stop"
            elif len(s.output) >= s.params.max_tokens:
                s.finish_reason = "length"
        s.text = text
        if s.finished:
            ready = len(text)
        else:   # hold back a partial UTF-8 character and anything that could still grow into a stop string
            ready = len(text.rstrip("\ufffd"))
            hold = max((len(stop) - 1 for stop in s.params.stop), default=0)
            ready = max(s.sent, min(ready, len(text) - hold))
        delta, s.sent = text[s.sent:ready], max(s.sent, ready)
        return Event(s, delta, [token])
