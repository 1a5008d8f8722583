"""The serve loop, every rank in lockstep: inbox -> schedule -> broadcast -> run -> deliver, one step at a time.

Rank 0 runs :class:`Engine`: it takes requests from the HTTP thread's inbox (ds_spd.serve.state.ServeState),
asks the scheduler for the next :class:`~ds_spd.serve.step.StepPlan`, sends it to the other ranks, runs it
(ds_spd.serve.executor), samples and delivers the new text to each request. The other ranks run :func:`follow`:
receive a plan, run it, until the stop plan. Nobody waits inside a collective for requests: an idle rank 0
waits on its inbox, an idle other rank in a socket read (ds_spd.serve.channel).

Roles, ports, signals and HTTP stay in ds_spd.serve.server; a signal reaches the loop through
:class:`Shutdown`.
"""
from __future__ import annotations

import queue
import time
from dataclasses import dataclass

from ds_spd.serve.state import Delta, ServeState
from ds_spd.serve.executor import StepExecutor
from ds_spd.serve.metrics import ServeMetrics
from ds_spd.serve.scheduler import Event, Scheduler, Sequence
from ds_spd.serve.step import STOP, StepPlan


@dataclass
class Shutdown:
    """A stop request: the first signal gives running requests ``timeout`` seconds, a second one ends them now.

    Signals less than ``same_stop`` seconds after the first are copies of it (a launcher forwarding a Ctrl-C)."""

    timeout: float
    same_stop: float
    signals: int = 0
    first: float | None = None
    deadline: float | None = None

    def request(self, now: float) -> bool:
        """Record a signal at ``now``; False if it is a copy of the first one."""
        if self.first is not None and now - self.first < self.same_stop:
            return False
        self.signals += 1
        self.first = self.first or now
        self.deadline = now if self.signals > 1 else now + self.timeout
        return True

    @property
    def requested(self) -> bool:
        return self.deadline is not None


class Engine:
    """Rank 0's loop over the scheduler and the executor; ``sender`` (None in one process) reaches the others."""

    def __init__(self, state: ServeState, scheduler: Scheduler, executor: StepExecutor, sender,
                 metrics: ServeMetrics, shutdown: Shutdown, log=print):
        self.state, self.scheduler, self.executor, self.sender = state, scheduler, executor, sender
        self.metrics, self.shutdown, self.log = metrics, shutdown, log
        self.requests: dict = {}   # request id -> the live request (ds_spd.serve.state.LiveRequest)

    def run(self) -> None:
        """Steps until a shutdown has drained (or timed out); then the other ranks are told to stop."""
        while True:
            self.take_inbox()
            if self.shutdown.requested and not self.drain():
                break
            self.step()
        self.broadcast(STOP)

    # ---- inbox
    def take_inbox(self) -> None:
        """New and cancelled requests; waits for one only when idle."""
        wait = not self.scheduler.has_work()
        while True:
            try:
                kind, payload = self.state.inbox.get(timeout=0.2) if wait else self.state.inbox.get_nowait()
            except queue.Empty:
                return
            wait = False
            if kind == "add":
                self.add(payload)
            elif kind == "cancel":
                self.scheduler.cancel(payload)
                self.requests.pop(payload, None)
            # "wake": a signal arrived; the loop checks the shutdown next

    def add(self, req) -> None:
        self.requests[req.id] = req
        seqs = [Sequence(req.id, p * req.n + i, ids, req.params)
                for p, ids in enumerate(req.prompts) for i in range(req.n)]
        self.scheduler.add(seqs)
        self.metrics.prompt_tokens.inc(sum(len(s.prompt) for s in seqs))

    def drain(self) -> bool:
        """During a shutdown: False once nothing runs; past the deadline, cancel and fail what is left."""
        if self.state.status == "ready":
            self.state.status = "draining"
        if not self.scheduler.has_work():
            return False
        if time.monotonic() >= self.shutdown.deadline:
            for rid in list(self.requests):
                self.scheduler.cancel(rid)
            self.state.fail_all(503, "the server is shutting down (shutdown timeout reached)")
            self.requests.clear()
        return True

    # ---- one step
    def step(self) -> None:
        plan = self.scheduler.plan()
        self.metrics.running.set(len(self.scheduler.running) + len(self.scheduler.prefilling))
        self.metrics.waiting.set(self.scheduler.queue_depth)
        if plan is None:
            return
        self.broadcast(plan)
        logits = self.executor.run(plan)
        events = self.scheduler.complete(plan, logits)
        self.metrics.steps.inc()
        for fwd, seconds in zip(plan.forwards, self.executor.seconds):
            self.metrics.forward.labels(fwd.kind).observe(seconds)
        for event in events:
            self.deliver(event)
        for rid in [r for r in self.requests if r not in self.state.live]:
            self.requests.pop(rid, None)   # finished or failed on the HTTP side

    def broadcast(self, plan: StepPlan) -> None:
        if self.sender is not None:
            self.sender.broadcast(plan.to_wire())

    def deliver(self, event: Event) -> None:
        s, req = event.seq, self.requests.get(event.seq.request_id)
        self.metrics.generation_tokens.inc(len(event.token_ids))
        if req is None:
            return
        if event.error is not None:   # this request fails alone: its other sequences leave at the next step
            self.log(f"request {req.id} failed: {event.error}")
            self.scheduler.cancel(req.id)
            self.requests.pop(req.id, None)
            self.state.finish(req.id)
            req.push(("error", 500, f"generation failed for this request: {event.error}"))
            return
        if len(s.output) == 1:
            req.push(("first", time.monotonic()))
        if s.finished and len(s.output) > 1:
            self.metrics.tpot.observe((time.monotonic() - s.first_token) / (len(s.output) - 1))
        req.push(("delta", Delta(s.index, event.delta, s.finish_reason, len(s.output), event.logprobs,
                                 event.prompt_logprobs, s.cached)))


def follow(receiver, executor: StepExecutor) -> None:
    """Another rank's loop: run each plan rank 0 sends (ds_spd.serve.channel.PlanReceiver) until the stop plan."""
    while True:
        plan = StepPlan.from_wire(receiver.next())
        if plan.stop:
            return
        executor.run(plan)
