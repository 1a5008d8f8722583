"""Serving one request on the HTTP side (worker threads and the event loop): parse, validate and tokenize its
body, hand it to the engine, then collect or stream the engine's deltas as OpenAI's response objects.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ds_spd.serve.protocol import ChatBody, CompletionBody, error_body
from ds_spd.serve.state import Delta, LiveRequest, RequestError, ServeState


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status, headers=headers)


def prepare(state: ServeState, raw: bytes, endpoint: str):
    """Parse, validate and tokenize one request body (in a worker thread): the body, its prompts, max_tokens."""
    tok = state.tokenizer
    if endpoint == "chat":
        body = ChatBody.model_validate_json(raw)
        if getattr(tok, "chat_template", None) is None:
            raise RequestError("messages", f"model {state.model_name} has no chat template: use /v1/completions")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        _check_chars(state, sum(len(m["content"]) for m in messages), "messages")
        try:
            ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"])
        except Exception as err:   # the template's own checks (e.g. roles out of order) are the caller's error
            raise RequestError("messages", f"the chat template refused these messages: {err}",
                               "chat_template_refused") from None
        prompts = [ids]
        max_tokens = body.max_completion_tokens or body.max_tokens or max(state.max_len - len(ids), 1)
    else:
        body = CompletionBody.model_validate_json(raw)
        items = _prompt_items(body.prompt)
        if len(items) * body.n > state.capacity:   # before tokenizing a million prompts
            raise RequestError("prompt", f"{len(items)} prompts x n={body.n} is more sequences than this server "
                              f"holds ({state.capacity}: --max-seqs + --max-queue)", "too_many_sequences")
        prompts = _completion_prompts(state, items)
        max_tokens = body.max_tokens or 16
    if body.model != state.model_name:
        raise RequestError("model", f"model '{body.model}' does not exist; this server serves '{state.model_name}'",
                          "model_not_found")
    longest = max(len(p) for p in prompts)
    if longest + max_tokens > state.max_len:
        raise RequestError("max_tokens" if body.max_tokens or getattr(body, "max_completion_tokens", None) else
                          ("messages" if endpoint == "chat" else "prompt"),
                          f"this model's context is {state.max_len} tokens; the request asks for {longest} prompt "
                          f"+ {max_tokens} completion tokens", "context_length_exceeded")
    echo = None
    if endpoint == "completion" and body.echo:   # the prompt's own text where it came as text
        echo = [item if isinstance(item, str) else tok.decode(ids) for item, ids in zip(items, prompts)]
    return body, prompts, max_tokens, echo


def _check_chars(state: ServeState, chars: int, param: str) -> None:
    if chars > state.max_chars:
        raise RequestError(param, f"this model's context is {state.max_len} tokens; a text of {chars} characters "
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
            raise RequestError("prompt", f"token ids must lie in [0, {vocab})")
    if any(len(p) == 0 for p in prompts):
        raise RequestError("prompt", "prompt is empty (it has no tokens)")
    return prompts


async def serve(state: ServeState, request: Request, endpoint: str):
    if state.status != "ready":
        raise RequestError(None, f"server is {state.status}", "unavailable", status=503)
    raw = await request.body()
    body, prompts, max_tokens, echo = await asyncio.get_running_loop().run_in_executor(
        state.workers, prepare, state, raw, endpoint)
    req = LiveRequest(f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", endpoint, prompts, body.n,
                      body.sampling(max_tokens), asyncio.get_running_loop(), echo=echo)
    state.submit(req)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_stream(state, req, include_usage), media_type="text/event-stream")
    return await _collect(state, req, request)


async def _events(state: ServeState, req: LiveRequest):
    """The request's :class:`Delta` events until every choice finished; raises RequestError on an engine failure."""
    left = req.choices
    while left:
        item = await req.events.get()
        if item[0] == "error":
            state.metrics.requests.labels(req.endpoint, "error").inc()
            raise RequestError(None, item[2], "engine_error", status=item[1])
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


def _usage(req: LiveRequest, generated: int, cached: dict[int, int]) -> dict:
    """OpenAI's usage; ``cached``: each choice's prompt tokens reused from the prefix cache (a prompt counts once:
    its first choice's, as ``prompt_tokens`` counts it once)."""
    prompt = sum(len(p) for p in req.prompts)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated,
            "prompt_tokens_details": {"cached_tokens": sum(cached.get(i, 0) for i in range(0, req.choices, req.n))}}


async def _collect(state: ServeState, req: LiveRequest, request: Request) -> JSONResponse:
    total, n = req.choices, req.n
    texts = {i: req.echo[i // n] if req.echo else "" for i in range(total)}
    reasons, generated, entries, cached = {}, 0, {i: [] for i in range(total)}, {}
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
            cached.setdefault(d.index, d.cached)
            entries[d.index] += (d.prompt_logprobs or []) + (d.logprobs or [])
            if d.finish_reason is not None:
                reasons[d.index], generated = d.finish_reason, generated + d.tokens
    except RequestError as err:
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
                         "choices": choices, "usage": _usage(req, generated, cached)})


async def _stream(state: ServeState, req: LiveRequest, include_usage: bool):
    created, chat = int(time.time()), req.endpoint == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"
    want, lp = req.params.logprobs is not None, _Logprobs(state.tokenizer, chat)
    offsets = {i: len(req.echo[i // req.n]) if req.echo else 0 for i in range(req.choices)}

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

    generated, finished, cached = 0, False, {}
    try:
        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(req.choices)])
        async for d in _events(state, req):
            cached.setdefault(d.index, d.cached)
            if d.finish_reason is not None:
                generated += d.tokens
            if d.prompt_logprobs is not None or (req.echo and d.tokens == 1):   # echo: the prompt first
                yield chunk([choice(d.index, req.echo[d.index // req.n] if req.echo else "", None, d.prompt_logprobs)])
            if not d.text and d.finish_reason is None and not (want and d.logprobs):
                continue
            yield chunk([choice(d.index, d.text, d.finish_reason, d.logprobs, offsets[d.index])])
            offsets[d.index] += len(d.text)
        if include_usage:
            yield chunk([], _usage(req, generated, cached))
        finished = True
        yield "data: [DONE]\n\n"
    except RequestError as err:
        finished = True
        yield f"data: {json.dumps(error_body(err.status, err.message, err.param, err.code))}\n\n"
    finally:
        if not finished:   # the client went away mid-stream: free its slots at the next step
            state.cancel(req)
