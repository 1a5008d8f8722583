"""What the HTTP side and the engine loop share: the inbox, the live requests, what a step delivers.

The engine (ds_spd.serve.engine) imports this module and no other of the HTTP side: no web framework, no
pydantic. Requests reach the loop through :class:`ServeState`'s inbox; results go back on each
:class:`LiveRequest`'s asyncio queue, fed from the loop's thread.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ds_spd.serve.sampling import SamplingParams


class RequestError(ValueError):
    """A request error that names its field."""

    def __init__(self, param: str, message: str, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.message, self.code, self.status = param, message, code, status



#: what /health reports: the server starts loading, serves when ready, drains on a stop, is dead after a rank died
STATUSES = ("loading", "ready", "draining", "dead")


@dataclass(eq=False)
class LiveRequest:
    """One HTTP request in flight: its sequences' events arrive on ``events`` (from the engine thread)."""

    id: str
    endpoint: str
    prompts: list[list[int]]
    n: int
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.monotonic)
    echo: list[str] | None = None    # ``echo``: each prompt's text, returned before its completions

    @property
    def choices(self) -> int:
        """Sequences this request runs: its prompts times ``n``."""
        return len(self.prompts) * self.n

    def push(self, item) -> None:
        """Called from any thread."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


@dataclass
class Delta:
    """What the engine delivers for one choice after a step: new text, and the tokens' log-probabilities."""

    index: int
    text: str
    finish_reason: str | None
    tokens: int                                 # tokens generated so far
    logprobs: list | None = None                # TokenLogprob of the new tokens (ds_spd.serve.scheduler)
    prompt_logprobs: list | None = None         # with the first token, for ``echo`` with ``logprobs``
    cached: int = 0                             # prompt tokens reused from the prefix cache (ds_spd.serve.prefix_cache)


class ServeState:
    """What the HTTP thread and the engine loop share: the inbox, the live requests, the status."""

    def __init__(self, model_name: str, tokenizer, max_len: int, metrics, max_seqs: int = 8, max_queue: int = 256):
        self.model_name, self.tokenizer, self.max_len, self.metrics = model_name, tokenizer, max_len, metrics
        self.capacity = max_seqs + max_queue   # sequences in flight: the running batch and the waiting queue
        self.status = "loading"          # one of STATUSES
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.live: dict[str, LiveRequest] = {}
        self.lock = threading.Lock()
        # a text longer than this cannot fit the context whatever it tokenizes to: refused without tokenizing
        # (4x: a normaliser may merge characters)
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1) if tokenizer is not None else 1
        self.max_chars = max_len * max(longest, 1) * 4
        self.workers = ThreadPoolExecutor(2, thread_name_prefix="ds-spd-parse")   # off the event loop

    def submit(self, req: LiveRequest) -> None:
        """Queue a request, or refuse it with 429 when the batch and the waiting queue are full."""
        with self.lock:
            in_flight = sum(r.choices for r in self.live.values())
            if in_flight and in_flight + req.choices > self.capacity:
                raise RequestError(None, f"the server is at capacity ({in_flight} sequences in flight, "
                                  f"{self.capacity} at most): retry later", "server_busy", status=429)
            self.live[req.id] = req
        self.inbox.put(("add", req))

    def cancel(self, req: LiveRequest) -> None:
        with self.lock:
            live = self.live.pop(req.id, None)
        if live is not None:
            self.inbox.put(("cancel", req.id))

    def finish(self, request_id: str) -> None:
        with self.lock:
            self.live.pop(request_id, None)

    def fail_all(self, status: int, message: str) -> int:
        """Fail every request in flight (a rank died, or the server stops): each gets an error event."""
        with self.lock:
            live, self.live = list(self.live.values()), {}
        for req in live:
            req.push(("error", status, message))
        return len(live)
