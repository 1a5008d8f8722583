"""One engine step as rank 0 plans it and every rank runs it, and its wire encoding (JSON, never pickle).

The scheduler (ds_spd.serve.scheduler) builds a :class:`StepPlan`; rank 0 sends :meth:`StepPlan.to_wire` to
the other ranks (ds_spd.serve.channel), each rebuilds it with :meth:`StepPlan.from_wire`, and every rank's
executor (ds_spd.serve.executor) applies the same plan: the slot moves, then the forwards, in order.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Move:
    """Copy ``length`` cached positions of slot ``src`` into slot ``dst`` (compaction, or an ``n`` > 1 fork)."""

    src: int
    dst: int
    length: int


@dataclass(frozen=True)
class Forward:
    """One model forward over consecutive cache slots ``slot ..``: a decode (one token per running sequence)
    or a prefill chunk of one sequence."""

    kind: str                   # "decode" or "prefill"
    slot: int                   # the first row's cache slot
    offsets: list[int]          # each row's cached length before this forward
    tokens: list[list[int]]     # each row's tokens (equal lengths)
    seqs: list[str]             # each row's sequence id
    keep: int = 1               # 1: the last position's logits; 0: every position's (a prompt being scored)

    def __post_init__(self):
        if self.kind not in ("decode", "prefill"):
            raise ValueError(f"unknown forward kind {self.kind!r}")


@dataclass(frozen=True)
class StepPlan:
    """What every rank does in one step; ``stop`` ends the other ranks' loops (nothing else is set then)."""

    moves: list[Move] = field(default_factory=list)
    forwards: list[Forward] = field(default_factory=list)
    done: list[str] = field(default_factory=list)   # sequences that left since the last plan
    stop: bool = False

    def to_wire(self) -> dict:
        if self.stop:
            return {"stop": True}
        return {"moves": [[m.src, m.dst, m.length] for m in self.moves],
                "forwards": [{"kind": f.kind, "slot": f.slot, "offsets": f.offsets, "tokens": f.tokens,
                              "seqs": f.seqs, "keep": f.keep} for f in self.forwards],
                "done": self.done}

    @classmethod
    def from_wire(cls, msg: dict) -> StepPlan:
        if msg.get("stop"):
            return STOP
        return cls(moves=[Move(*m) for m in msg["moves"]], forwards=[Forward(**f) for f in msg["forwards"]],
                   done=list(msg["done"]))


#: the plan that ends the other ranks' loops
STOP = StepPlan(stop=True)
