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
queue the loop feeds. By role: this module holds the app, its routes, the gate and the exception handlers; the
request bodies and error objects are ds_spd.serve.protocol's, a request's handling ds_spd.serve.serving's, what
the engine shares with the HTTP side ds_spd.serve.state's (the only one of them the engine imports).
"""
from __future__ import annotations

import hmac

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ds_spd.serve.openapi import body_reference, openapi_schema
from ds_spd.serve.protocol import ChatBody, CompletionBody, validation_error
from ds_spd.serve.serving import error_response, serve
from ds_spd.serve.state import RequestError, ServeState


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


def build_app(state: ServeState, api_key: str | None = None, max_request_bytes: int = 4 * 2**20):
    """The ASGI app: FastAPI's routes behind :class:`Gate` (API key, body-size limit)."""
    app = FastAPI(title="ds-spd serve", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        return _error(validation_error(exc.errors()))

    @app.exception_handler(ValidationError)
    async def _invalid_body(_request, exc: ValidationError):
        return _error(validation_error(exc.errors()))

    @app.exception_handler(RequestError)
    async def _field(_request, exc: RequestError):
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

    @app.post("/v1/completions", openapi_extra=body_reference(CompletionBody))
    async def completions(request: Request):
        return await serve(state, request, "completion")

    @app.post("/v1/chat/completions", openapi_extra=body_reference(ChatBody))
    async def chat(request: Request):
        return await serve(state, request, "chat")

    def published() -> dict:   # built once, on the first request for it (the routes are all there then)
        if app.openapi_schema is None:
            app.openapi_schema = openapi_schema(app, state, api_key is not None, max_request_bytes)
        return app.openapi_schema
    app.openapi = published
    return Gate(app, api_key, max_request_bytes)


def _error(err: RequestError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status == 429 else None
    return error_response(err.status, err.message, err.param, err.code, headers)
