"""The OpenAPI schema ``/openapi.json`` publishes: every answer the server gives, every constraint it enforces.

Client generators and API gateways read this schema, so it states what the server does, not only what FastAPI
infers: each route's error answers (OpenAI's error object, with the status it comes with), ``/metrics`` as
Prometheus text, ``/health``'s 503, the bearer key where one is set; and the request bodies with the limits this
server holds them to (the served model's name, non-empty prompts within the vocabulary, completion lengths
within the context, as many sequences as it holds). What no JSON schema can say (a prompt's token count plus
``max_tokens`` over the context; a chat template that refuses the order of the messages) is a 400 whose ``code``
names it, and the 400's description lists those codes.
"""
from __future__ import annotations

from pydantic import BaseModel

from ds_spd.serve.protocol import BIAS_LIMIT, MAX_BIASED, MAX_STOPS, UNSUPPORTED, ChatBody, CompletionBody
from ds_spd.serve.state import STATUSES, ServeState

#: 400 codes a body valid under the published schema can still get (the joint limits a schema cannot state)
JOINT_LIMIT_CODES = ("context_length_exceeded", "too_many_sequences", "chat_template_refused")

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}

_COUNT = {"type": "integer", "minimum": 0}
_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"],
          "properties": {**{k: _COUNT for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
                         "prompt_tokens_details": {
                             "type": "object", "required": ["cached_tokens"], "properties": {"cached_tokens": {
                                 **_COUNT, "description": "prompt tokens reused from the prefix cache, not prefilled"}}}}}


def _answer(object_name: str, choice: dict) -> dict:
    return {"type": "object", "required": ["id", "object", "created", "model", "choices"], "properties": {
        "id": {"type": "string"}, "object": {"const": object_name}, "created": {"type": "integer"},
        "model": {"type": "string"}, "usage": _USAGE,
        "choices": {"type": "array", "items": {"type": "object", "required": ["index", "finish_reason"],
                                               "properties": {"index": {"type": "integer", "minimum": 0},
                                                              "finish_reason": {"enum": ["stop", "length", None]},
                                                              **choice}}}}}


_COMPLETION = _answer("text_completion", {"text": {"type": "string"}, "logprobs": {"type": ["object", "null"]}})
_CHAT = _answer("chat.completion", {"message": {"type": "object", "required": ["role", "content"], "properties": {
    "role": {"const": "assistant"}, "content": {"type": "string"}}}, "logprobs": {"type": ["object", "null"]}})


#: one Server-Sent Event of a stream (an OpenAPI 3.1 stream's schema describes each event)
_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {
    "type": "string", "description": "a chunk object as JSON, an error object as JSON, or [DONE] (the last)"}}}


def _error(description: str, headers: dict | None = None) -> dict:
    answer = {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    if headers:
        answer["headers"] = headers
    return answer


def _generation_answers(secured: bool, max_mb: float, answer: str) -> dict:
    answers = {
        "200": {"description": "the completion; with \"stream\": true, Server-Sent Events of chunks ending "
                               "\"data: [DONE]\"",
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{answer}"}},
                            "text/event-stream": {"schema": _EVENT}}},
        "400": _error("the body is not valid (the field is named in \"param\"): not JSON, an unknown or unsupported "
                      "field, a value out of range, another model's name; or a limit no schema states, named by "
                      f"\"code\": {', '.join(JOINT_LIMIT_CODES)}"),
        "413": _error(f"the body is over {max_mb:g} MB (--max-request-mb)"),
        "429": _error("the running batch and the waiting queue are full: retry later",
                      {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}),
        "500": _error("an internal error (a bug), in OpenAI's error shape"),
        "503": _error("the server is loading or draining, or a rank died during the request"),
    }
    if secured:
        answers["401"] = _error("no valid API key: send \"Authorization: Bearer KEY\"")
    return answers


def _tighten(body: dict, state: ServeState) -> None:
    """The limits the server enforces on a body, written into its JSON schema."""
    props = body["properties"]
    props["model"] = {"type": "string", "enum": [state.model_name], "description": "the served model's name"}
    longest = max(state.max_len - 1, 1)   # the shortest prompt is one token
    for key in ("max_tokens", "max_completion_tokens"):
        if key in props:
            props[key] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": longest}, {"type": "null"}],
                          "description": f"completion tokens; with the prompt's, at most the context "
                                         f"({state.max_len} tokens)"}
    for name, unused in UNSUPPORTED.items():
        props[name] = {"enum": list(unused), "description": "not supported here: only the value meaning 'not used'"}
    props["stop"] = {"anyOf": [{"type": "string", "minLength": 1},
                               {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOPS},
                               {"type": "null"}], "description": f"up to {MAX_STOPS} non-empty strings"}
    props["logit_bias"] = {"anyOf": [{"type": "object", "maxProperties": MAX_BIASED,
                                      "propertyNames": {"pattern": "^[0-9]+$"},
                                      "additionalProperties": {"type": "number", "minimum": -BIAS_LIMIT,
                                                               "maximum": BIAS_LIMIT}},
                                     {"type": "null"}],
                           "description": f"token id (a string of digits) -> bias in [-{BIAS_LIMIT}, {BIAS_LIMIT}]"}
    needs = [("stream_options", "stream")] + ([("top_logprobs", "logprobs")] if "top_logprobs" in props else [])
    body["allOf"] = [{"if": {"required": [field], "properties": {field: {"not": {"type": "null"}}}},
                      "then": {"required": [flag], "properties": {flag: {"const": True}}}} for field, flag in needs]
    if "prompt" in props:
        vocab = len(state.tokenizer) if state.tokenizer is not None else None
        token = {"type": "integer", "minimum": 0, **({"maximum": vocab - 1} if vocab else {})}
        text = {"type": "string", "minLength": 1}
        many = state.capacity
        props["prompt"] = {"anyOf": [text, {"type": "array", "items": text, "minItems": 1, "maxItems": many},
                                     {"type": "array", "items": token, "minItems": 1},
                                     {"type": "array", "items": {"type": "array", "items": token, "minItems": 1},
                                      "minItems": 1, "maxItems": many}],
                           "description": f"a text, texts, token ids or lists of them (prompts x n at most {many})"}


def openapi_schema(app, state: ServeState, secured: bool, max_request_bytes: int) -> dict:
    """The whole schema: FastAPI's paths with this server's answers and body limits."""
    from fastapi.openapi.utils import get_openapi
    schema = get_openapi(title=app.title, version="1", routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (CompletionBody, ChatBody):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        _tighten(body, state)
        components[model.__name__] = body
    components["ChatMessage"]["properties"]["content"] = {"anyOf": [{"type": "string"}, {"type": "array", "items": {
        "type": "object", "required": ["type"], "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}],
        "description": "a text, or content parts of type text"}
    components.update({"Error": _ERROR, "Completion": _COMPLETION, "ChatCompletion": _CHAT})
    paths, max_mb = schema["paths"], max_request_bytes / 2**20
    paths["/v1/completions"]["post"]["responses"] = _generation_answers(secured, max_mb, "Completion")
    paths["/v1/chat/completions"]["post"]["responses"] = _generation_answers(secured, max_mb, "ChatCompletion")
    paths["/v1/models"]["get"]["responses"] = {"200": {"description": "the served model", "content": {
        "application/json": {"schema": {"type": "object", "required": ["object", "data"]}}}},
        **({"401": _error("no valid API key")} if secured else {})}
    status = {"type": "object", "required": ["status"],
              "properties": {"status": {"enum": list(STATUSES)}}}
    paths["/health"]["get"]["responses"] = {
        "200": {"description": "every rank is alive and serving", "content": {"application/json": {"schema": status}}},
        "503": {"description": "loading, draining, or a rank died", "content": {"application/json": {"schema": status}}}}
    paths["/metrics"]["get"]["responses"] = {"200": {"description": "Prometheus text exposition", "content": {
        "text/plain": {"schema": {"type": "string"}}}}}
    if secured:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, ops in paths.items():
            if path.startswith("/v1/"):
                for op in ops.values():
                    op["security"] = [{"bearer": []}]
    return schema


def body_reference(model: type[BaseModel]) -> dict:
    """The route's request body in the schema (the body is parsed by hand, off the event loop)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}
