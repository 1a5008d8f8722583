"""The OpenAI-compatible HTTP API of rank 0 (FastAPI), as vLLM's server shapes it.

``POST /v1/completions``, ``POST /v1/chat/completions`` (the model's chat template), ``GET /v1/models``,
``GET /health`` (200 while every rank is alive and serving, 503 while loading, draining or after a rank died),
``GET /metrics`` (Prometheus). Streaming is Server-Sent Events ending ``data: [DONE]``. Every error, the
framework's own included (404, 405, 413, 500), is ``{"error": {"message", "type", "param", "code"}}``. A field
this server cannot honour is refused by name, never ignored; an unknown field is refused too; booleans are not
numbers.

Exposed safely: with an API key, ``/v1/*`` needs ``Authorization: Bearer KEY`` (compared in constant time;
``/health`` and ``/metrics`` stay open); a body over the size limit is refused with 413 before it is read whole;
more sequences in flight than the running batch plus the waiting queue get 429 with Retry-After. Parsing,
validation and tokenization run in worker threads, so a large request never stalls ``/health`` or the streams.

The HTTP side runs in its own thread with its own event loop; it hands requests to the engine loop
(ds_spd.serve.engine, main thread) through :class:`ServeState` and reads results from a per-request asyncio
queue the loop feeds.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import (BaseModel, ConfigDict, Field, StrictInt, TypeAdapter, ValidationError, field_validator,
                      model_validator)
from starlette.exceptions import HTTPException as StarletteHTTPException

from ds_spd.serve.sampling import SamplingParams


# ---------------------------------------------------------------- request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


#: Fields of OpenAI's API this server cannot honour, with the value that means "not used" (accepted as such).
UNSUPPORTED = {"suffix": (None,), "best_of": (None, 1), "tools": (None, []), "tool_choice": (None, "none"),
               "response_format": (None, {"type": "text"}), "parallel_tool_calls": (None,), "functions": (None,),
               "function_call": (None,)}


_INT64 = 2**63   # seeds, token counts: what a 64-bit integer holds (a 5000-digit number is refused by name)
_PENALTY = dict(ge=-2, le=2, strict=True)


class _Sampling(_Body):
    model: str
    max_tokens: Optional[int] = Field(None, gt=0, lt=_INT64, strict=True)
    temperature: float = Field(1.0, ge=0, le=2, strict=True)
    top_p: float = Field(1.0, gt=0, le=1, strict=True)
    top_k: int = Field(0, ge=-1, lt=_INT64, strict=True,
                       description="vLLM's extension: sample from the k best tokens (0 or -1: all)")
    ignore_eos: bool = Field(False, strict=True,
                             description="vLLM's extension: go on past end-of-sequence up to max_tokens")
    seed: Optional[int] = Field(None, ge=-_INT64, lt=_INT64, strict=True)
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1, le=16, strict=True)
    stream: bool = Field(False, strict=True)
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None   # metadata for the client's own accounting; not used
    presence_penalty: Optional[float] = Field(None, **_PENALTY)
    frequency_penalty: Optional[float] = Field(None, **_PENALTY)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=10, strict=True,
                                                description="vLLM's extension: > 1 discourages prompt and output tokens")
    logit_bias: Optional[dict[str, float]] = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    min_tokens: int = Field(0, ge=0, lt=_INT64, strict=True,
                            description="vLLM's extension: no end-of-sequence before this many tokens")
    suffix: Any = None
    best_of: Any = None
    tools: Any = None
    tool_choice: Any = None
    response_format: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        for name, unused in UNSUPPORTED.items():
            if getattr(self, name) not in unused:
                raise _FieldError(name, f"'{name}' is not supported by this server (it would be ignored)")
        if self.stream_options is not None and not self.stream:
            raise _FieldError("stream_options", "'stream_options' needs 'stream': true")
        return self

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if any(not s for s in stops) or len(stops) > 4:
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return v
        if len(v) > 300 or any(not k.isdigit() or not -100 <= b <= 100 for k, b in v.items()):
            raise ValueError("logit_bias maps up to 300 token ids (strings of digits) to biases in [-100, 100]")
        return v

    def params(self, max_tokens: int, logprobs: int | None = None, prompt_logprobs: int | None = None
               ) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=max(self.top_k, 0), seed=self.seed, stop=tuple(self.stop or ()),
                              ignore_eos=self.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                              presence_penalty=self.presence_penalty or 0.0,
                              frequency_penalty=self.frequency_penalty or 0.0,
                              repetition_penalty=self.repetition_penalty or 1.0,
                              logit_bias=tuple((int(k), b) for k, b in (self.logit_bias or {}).items()),
                              min_tokens=self.min_tokens)


_Prompt = Union[str, list[str], list[StrictInt], list[list[StrictInt]]]
_PROMPT_LISTS = {str: TypeAdapter(list[str]), int: TypeAdapter(list[StrictInt]),
                 list: TypeAdapter(list[list[StrictInt]])}


class CompletionBody(_Sampling):
    prompt: _Prompt
    logprobs: Optional[int] = Field(None, ge=0, le=20, strict=True,
                                    description="log-probabilities of each token, with this many alternatives")
    echo: bool = Field(False, strict=True, description="the prompt before the completion (with logprobs: scored)")

    def sampling(self, max_tokens: int) -> SamplingParams:
        return self.params(max_tokens, self.logprobs, self.logprobs if self.echo else None)

    @field_validator("prompt", mode="plain", json_schema_input_type=_Prompt)
    @classmethod
    def _prompt(cls, v):
        """The form is decided by the first element, then checked once (a union would try every form on every
        element: a second on a 4 MB list of token ids, holding the interpreter)."""
        if isinstance(v, str):
            return v
        adapter = _PROMPT_LISTS.get(type(v[0]) if isinstance(v, list) and v else int) if isinstance(v, list) else None
        if adapter is None:
            raise ValueError("prompt is a string, a list of strings, a list of token ids or a list of such lists")
        try:
            return adapter.validate_python(v, strict=True)
        except ValidationError as err:
            first = err.errors()[0]
            raise ValueError(f"prompt{''.join(f'[{i}]' for i in first['loc'])}: {first['msg']}") from None


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[dict]]
    name: Optional[str] = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise _FieldError("messages", f"content part of type {part.get('type')!r} is not supported (text only)")
            parts.append(part.get("text", ""))
        return "".join(parts)


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, gt=0, lt=_INT64, strict=True)
    logprobs: bool = Field(False, strict=True)
    top_logprobs: Optional[int] = Field(None, ge=0, le=20, strict=True)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise _FieldError("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        return self

    def sampling(self, max_tokens: int) -> SamplingParams:
        return self.params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)


class _FieldError(ValueError):
    """A request error that names its field."""

    def __init__(self, param: str, message: str, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.message, self.code, self.status = param, message, code, status


_ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error", 503: "service_unavailable"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status, headers=headers)


def validation_error(errors: list[dict]) -> _FieldError:
    """The first of pydantic's (or FastAPI's) validation errors as a 400 that names its field."""
    err = errors[0]
    ctx_err = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_err, _FieldError):
        return ctx_err
    loc = [str(p) for p in err.get("loc", ()) if p != "body" and not isinstance(p, int)]
    param = loc[0] if loc else None
    if err.get("type") == "json_invalid":
        return _FieldError(None, f"request body is not valid JSON (UTF-8): {err.get('msg')}", "invalid_json")
    if err.get("type") == "extra_forbidden":
        return _FieldError(param, f"unknown field '{'.'.join(loc)}'", "unknown_field")
    what = "missing" if err.get("type") == "missing" else err.get("msg", "invalid value")
    return _FieldError(param, f"{'.'.join(loc) or 'body'}: {what}", err.get("type"))


class Gate:
    """ASGI middleware in front of every route: the API key on ``/v1/*``, then the body-size limit.

    The body is read here, chunk by chunk, and refused with 413 as soon as it passes ``max_bytes`` (a declared
    Content-Length over the limit is refused before any byte is read); the app then gets it in one piece.
    """

    def __init__(self, app, api_key: str | None, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.key is not None and (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
            given = headers.get(b"authorization", b"")
            if not (given[:7].lower() == b"bearer " and hmac.compare_digest(given[7:].strip(), self.key)):
                return await error_response(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                                            None, "invalid_api_key")(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_large = error_response(413, f"request body exceeds {self.max_bytes} bytes (--max-request-mb)", None,
                                   "request_too_large")
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.max_bytes:
            return await too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await too_large(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, delivered = b"".join(chunks), False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()   # after the body: the client's disconnect, as the app polls for it
        return await self.app(scope, replay, send)


# ---------------------------------------------------------------- shared state
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


class ServeState:
    """What the HTTP thread and the engine loop share: the inbox, the live requests, the status."""

    def __init__(self, model_name: str, tokenizer, max_len: int, metrics, max_seqs: int = 8, max_queue: int = 256):
        self.model_name, self.tokenizer, self.max_len, self.metrics = model_name, tokenizer, max_len, metrics
        self.capacity = max_seqs + max_queue   # sequences in flight: the running batch and the waiting queue
        self.status = "loading"          # loading | ready | draining | dead
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
            in_flight = sum(_choices_total(r) for r in self.live.values())
            if in_flight and in_flight + _choices_total(req) > self.capacity:
                raise _FieldError(None, f"the server is at capacity ({in_flight} sequences in flight, "
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


# ---------------------------------------------------------------- the app
def build_app(state: ServeState, api_key: str | None = None, max_request_bytes: int = 4 * 2**20):
    """The ASGI app: FastAPI's routes behind :class:`Gate` (API key, body-size limit)."""
    app = FastAPI(title="ds-spd serve", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        return _error(validation_error(exc.errors()))

    @app.exception_handler(ValidationError)
    async def _invalid_body(_request, exc: ValidationError):
        return _error(validation_error(exc.errors()))

    @app.exception_handler(_FieldError)
    async def _field(_request, exc: _FieldError):
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):   # 404, 405: the framework's own, in OpenAI's shape
        what = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error_response(exc.status_code, what.get(exc.status_code, str(exc.detail)), None,
                              {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code),
                              getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(_request, exc: Exception):   # a bug: a 500 in OpenAI's shape, never the framework's text
        return error_response(500, f"internal error: {type(exc).__name__}", None, "internal_error")

    @app.get("/health")
    async def health():
        ok = state.status == "ready"
        return JSONResponse({"status": state.status}, 200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                            "owned_by": "ds_spd", "max_model_len": state.max_len}]}

    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionBody))
    async def completions(request: Request):
        return await _serve(state, request, "completion")

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatBody))
    async def chat(request: Request):
        return await _serve(state, request, "chat")

    _publish_body_schemas(app)
    return Gate(app, api_key, max_request_bytes)


def _error(err: _FieldError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status == 429 else None
    return error_response(err.status, err.message, err.param, err.code, headers)


def _body_schema(model: type[BaseModel]) -> dict:
    """The route's request body in the OpenAPI schema (the body is parsed by hand, off the event loop)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _publish_body_schemas(app: FastAPI) -> None:
    from fastapi.openapi.utils import get_openapi

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version="1", routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (CompletionBody, ChatBody):
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            app.openapi_schema = schema
        return app.openapi_schema
    app.openapi = openapi


def _prepare(state: ServeState, raw: bytes, endpoint: str):
    """Parse, validate and tokenize one request body (in a worker thread): the body, its prompts, max_tokens."""
    tok = state.tokenizer
    if endpoint == "chat":
        body = ChatBody.model_validate_json(raw)
        if getattr(tok, "chat_template", None) is None:
            raise _FieldError("messages", f"model {state.model_name} has no chat template: use /v1/completions")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        _check_chars(state, sum(len(m["content"]) for m in messages), "messages")
        try:
            ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"])
        except Exception as err:   # the template's own checks (e.g. roles out of order) are the caller's error
            raise _FieldError("messages", f"the chat template refused these messages: {err}") from None
        prompts = [ids]
        max_tokens = body.max_completion_tokens or body.max_tokens or max(state.max_len - len(ids), 1)
    else:
        body = CompletionBody.model_validate_json(raw)
        items = _prompt_items(body.prompt)
        if len(items) * body.n > state.capacity:   # before tokenizing a million prompts
            raise _FieldError("prompt", f"{len(items)} prompts x n={body.n} is more sequences than this server "
                              f"holds ({state.capacity}: --max-seqs + --max-queue)")
        prompts = _completion_prompts(state, items)
        max_tokens = body.max_tokens or 16
    if body.model != state.model_name:
        raise _FieldError("model", f"model '{body.model}' does not exist; this server serves '{state.model_name}'",
                          "model_not_found")
    longest = max(len(p) for p in prompts)
    if longest + max_tokens > state.max_len:
        raise _FieldError("max_tokens" if body.max_tokens or getattr(body, "max_completion_tokens", None) else
                          ("messages" if endpoint == "chat" else "prompt"),
                          f"this model's context is {state.max_len} tokens; the request asks for {longest} prompt "
                          f"+ {max_tokens} completion tokens", "context_length_exceeded")
    echo = None
    if endpoint == "completion" and body.echo:   # the prompt's own text where it came as text
        echo = [item if isinstance(item, str) else tok.decode(ids) for item, ids in zip(items, prompts)]
    return body, prompts, max_tokens, echo


def _check_chars(state: ServeState, chars: int, param: str) -> None:
    if chars > state.max_chars:
        raise _FieldError(param, f"this model's context is {state.max_len} tokens; a text of {chars} characters "
                          "cannot fit it", "context_length_exceeded")


def _prompt_items(prompt) -> list:
    """A completion's prompts, each a text or a list of token ids (a lone text or id list is one prompt)."""
    return [prompt] if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int) else list(prompt)


def _completion_prompts(state: ServeState, items: list) -> list[list[int]]:
    """The token ids of :func:`_prompt_items`: texts tokenized (unless too long to fit), ids checked."""
    tok = state.tokenizer
    if isinstance(items[0], str):
        for t in items:
            _check_chars(state, len(t), "prompt")
        prompts = [tok(t).input_ids for t in items]
    else:
        prompts = items
        vocab = len(tok)
        if any(not 0 <= t < vocab for p in prompts for t in p):
            raise _FieldError("prompt", f"token ids must lie in [0, {vocab})")
    if any(len(p) == 0 for p in prompts):
        raise _FieldError("prompt", "prompt is empty (it has no tokens)")
    return prompts


async def _serve(state: ServeState, request: Request, endpoint: str):
    if state.status != "ready":
        raise _FieldError(None, f"server is {state.status}", "unavailable", status=503)
    raw = await request.body()
    body, prompts, max_tokens, echo = await asyncio.get_running_loop().run_in_executor(
        state.workers, _prepare, state, raw, endpoint)
    req = LiveRequest(f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", endpoint, prompts, body.n,
                      body.sampling(max_tokens), asyncio.get_running_loop(), echo=echo)
    state.submit(req)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_stream(state, req, include_usage), media_type="text/event-stream")
    return await _collect(state, req, request)


def _choices_total(req: LiveRequest) -> int:
    return len(req.prompts) * req.n


async def _events(state: ServeState, req: LiveRequest):
    """The request's :class:`Delta` events until every choice finished; raises _FieldError on an engine failure."""
    left = _choices_total(req)
    while left:
        item = await req.events.get()
        if item[0] == "error":
            state.metrics.requests.labels(req.endpoint, "error").inc()
            raise _FieldError(None, item[2], "engine_error", status=item[1])
        if item[0] == "first":
            state.metrics.ttft.observe(item[1] - req.arrival)
            continue
        delta: Delta = item[1]
        if delta.finish_reason is not None:
            left -= 1
        yield delta
    state.finish(req.id)
    state.metrics.requests.labels(req.endpoint, "ok").inc()
    state.metrics.e2e.observe(time.monotonic() - req.arrival)


class _Logprobs:
    """OpenAI's log-probability objects, from the engine's (token, logprob, alternatives) reports."""

    def __init__(self, tokenizer, chat: bool):
        self.tok, self.chat = tokenizer, chat

    def text(self, token: int) -> str:
        return self.tok.decode([token])

    def completion(self, entries: list, offset: int = 0) -> dict:
        """``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``; offsets from ``offset`` on."""
        tokens = [self.text(t) for t, _, _ in entries]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [None if lp is None else {self.text(i): v for i, v in alts}
                                 for _, lp, alts in entries], "text_offset": offsets}

    def content(self, entries: list) -> dict:
        """Chat's ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``."""
        def item(token: int, lp: float) -> dict:
            text = self.text(token)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}
        return {"content": [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in alts]} for t, lp, alts in entries]}

    def of(self, entries: list | None, offset: int = 0) -> dict | None:
        if entries is None:
            return None
        return self.content(entries) if self.chat else self.completion(entries, offset)


def _usage(req: LiveRequest, generated: int) -> dict:
    prompt = sum(len(p) for p in req.prompts)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


async def _collect(state: ServeState, req: LiveRequest, request: Request) -> JSONResponse:
    total, n = _choices_total(req), req.n
    texts = {i: req.echo[i // n] if req.echo else "" for i in range(total)}
    reasons, generated, entries = {}, 0, {i: [] for i in range(total)}
    want = req.params.logprobs is not None
    agen = _events(state, req)
    try:
        while True:
            # wait without cancelling the generator (a cancelled __anext__ would close it): poll for a client
            # that went away once a second, and free its slots
            step = asyncio.ensure_future(agen.__anext__())
            while not (await asyncio.wait({step}, timeout=1.0))[0]:
                if await request.is_disconnected():
                    step.cancel()
                    state.cancel(req)
                    return error_response(499, "client disconnected")
            try:
                d = step.result()
            except StopAsyncIteration:
                break
            texts[d.index] += d.text
            entries[d.index] += (d.prompt_logprobs or []) + (d.logprobs or [])
            if d.finish_reason is not None:
                reasons[d.index], generated = d.finish_reason, generated + d.tokens
    except _FieldError as err:
        return error_response(err.status, err.message, err.param, err.code)
    created, lp = int(time.time()), _Logprobs(state.tokenizer, req.endpoint == "chat")
    if req.endpoint == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": lp.of(entries[i]) if want else None, "finish_reason": reasons[i]} for i in range(total)]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": texts[i], "logprobs": lp.of(entries[i]) if want else None,
                    "finish_reason": reasons[i]} for i in range(total)]
        obj = "text_completion"
    return JSONResponse({"id": req.id, "object": obj, "created": created, "model": state.model_name,
                         "choices": choices, "usage": _usage(req, generated)})


async def _stream(state: ServeState, req: LiveRequest, include_usage: bool):
    created, chat = int(time.time()), req.endpoint == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"
    want, lp = req.params.logprobs is not None, _Logprobs(state.tokenizer, chat)
    offsets = {i: len(req.echo[i // req.n]) if req.echo else 0 for i in range(_choices_total(req))}

    def chunk(choices: list, usage: dict | None = None) -> str:
        body = {"id": req.id, "object": obj, "created": created, "model": state.model_name, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def choice(index: int, text: str, reason: str | None, entries: list | None, offset: int = 0) -> dict:
        logprobs = lp.of(entries, offset) if want and entries else None
        if chat:
            return {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                    "finish_reason": reason}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    generated, finished = 0, False
    try:
        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(_choices_total(req))])
        async for d in _events(state, req):
            if d.finish_reason is not None:
                generated += d.tokens
            if d.prompt_logprobs is not None or (req.echo and d.tokens == 1):   # echo: the prompt first
                yield chunk([choice(d.index, req.echo[d.index // req.n] if req.echo else "", None, d.prompt_logprobs)])
            if not d.text and d.finish_reason is None and not (want and d.logprobs):
                continue
            yield chunk([choice(d.index, d.text, d.finish_reason, d.logprobs, offsets[d.index])])
            offsets[d.index] += len(d.text)
        if include_usage:
            yield chunk([], _usage(req, generated))
        finished = True
        yield "data: [DONE]\n\n"
    except _FieldError as err:
        finished = True
        yield f"data: {json.dumps(error_body(err.status, err.message, err.param, err.code))}\n\n"
    finally:
        if not finished:   # the client went away mid-stream: free its slots at the next step
            state.cancel(req)
