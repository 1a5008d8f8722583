"""Property-based fuzzing of a running OpenAI-compatible server (``ds-spd serve``): no request may hurt anyone.

Hypothesis generates request bodies for ``/v1/completions`` and ``/v1/chat/completions`` from the OpenAPI schema
the server publishes (:func:`from_schema`: the JSON-schema subset pydantic writes), mixed with hostile variants: schema fields set to any JSON value,
extreme numbers where the schema wants them, unknown fields, invalid UTF-8 and truncated JSON. Every answer must
be a 200 in OpenAI's completion shape (streamed: SSE chunks ending ``[DONE]``) or a 4xx in OpenAI's error shape;
a 5xx, a connection error or another shape fails the run, which Hypothesis then shrinks to a minimal body.

    python -m ds_spd.tools.fuzz_serve --url http://127.0.0.1:8000 --examples 3000 [--api-key KEY]

The tests run a bounded number of examples against a real 2-rank server (tests/serve/test_serve.py).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys

#: answers a well-behaved server may give a hostile client
ALLOWED = {200, 400, 404, 413, 429}
ERROR_KEYS = {"message", "type", "param", "code"}
_TOKEN = {"type": "integer", "minimum": 0, "maximum": 255}   # every vocabulary has these ids
_TEXT = {"type": "string", "minLength": 1}
#: the "valid" draws: short completions (the fuzzer hunts for crashes, not long generations), prompts that
#: tokenize to something, so that most reach the engine with whatever sampling values the schema allows
SHORT = {"max_tokens": {"type": "integer", "minimum": 1, "maximum": 6},
         "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": 6},
         "n": {"type": "integer", "minimum": 1, "maximum": 3},
         "prompt": {"anyOf": [_TEXT, {"type": "array", "items": _TEXT, "minItems": 1},
                              {"type": "array", "items": _TOKEN, "minItems": 1},
                              {"type": "array", "items": {"type": "array", "items": _TOKEN, "minItems": 1},
                               "minItems": 1}]}}


def check_answer(status: int, content_type: str, text: str, streamed: bool) -> str | None:
    """Why this answer is not acceptable (None if it is)."""
    if status not in ALLOWED:
        return f"HTTP {status}"
    if status == 200 and streamed and content_type.startswith("text/event-stream"):
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return "a stream that does not end with [DONE]"
        for e in events[:-1]:
            obj = json.loads(e)
            if "error" in obj or "choices" not in obj:
                return f"a stream chunk that is not a completion chunk: {e[:200]}"
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return f"a body that is not JSON: {text[:200]!r}"
    if status == 200:
        return None if isinstance(obj.get("choices"), list) and "usage" in obj else f"not a completion: {text[:200]}"
    err = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(err, dict) or set(err) != ERROR_KEYS or not err["message"]:
        return f"not OpenAI's error shape: {text[:200]}"
    return None


def from_schema(node: dict, components: dict, any_json):
    """A Hypothesis strategy for the JSON-schema subset pydantic writes (type, anyOf, enum, const, bounds, $ref)."""
    from hypothesis import strategies as st
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[1]
        return st.deferred(lambda: from_schema(components[name], components, any_json))
    if "const" in node:
        return st.just(node["const"])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    if "anyOf" in node:
        return st.one_of([from_schema(n, components, any_json) for n in node["anyOf"]])
    kind = node.get("type")
    if kind == "integer":
        lo = node.get("minimum", node["exclusiveMinimum"] + 1 if "exclusiveMinimum" in node else None)
        hi = node.get("maximum", node["exclusiveMaximum"] - 1 if "exclusiveMaximum" in node else None)
        return st.integers(lo, hi)
    if kind == "number":
        return st.floats(node.get("minimum", node.get("exclusiveMinimum")),
                         node.get("maximum", node.get("exclusiveMaximum")), allow_nan=False, allow_infinity=False,
                         exclude_min="exclusiveMinimum" in node, exclude_max="exclusiveMaximum" in node)
    if kind == "array":
        return st.lists(from_schema(node.get("items", {}), components, any_json), min_size=node.get("minItems", 0),
                        max_size=max(node.get("minItems", 0), 4))
    if kind == "object" and "properties" in node:
        props = {k: from_schema(v, components, any_json) for k, v in node["properties"].items()}
        required = set(node.get("required", ()))
        return st.fixed_dictionaries({k: v for k, v in props.items() if k in required},
                                     optional={k: v for k, v in props.items() if k not in required})
    simple = {"null": st.none(), "boolean": st.booleans(), "string": st.text(min_size=node.get("minLength", 0),
                                                                             max_size=40),
              "object": st.dictionaries(st.text(max_size=8), any_json, max_size=3)}
    return simple.get(kind, any_json)   # no type: any JSON value


def _strategies(schema: dict, model: str):
    from hypothesis import strategies as st

    components = schema["components"]["schemas"]

    def body_schema(name: str, short: bool) -> dict:
        body = json.loads(json.dumps(components[name]))
        body["properties"]["model"] = {"const": model}
        if short:   # completions short, and no field the server refuses whatever its value (logprobs, tools...)
            body["properties"] = {k: SHORT.get(k, v) for k, v in body["properties"].items()
                                  if set(v) & {"type", "anyOf", "$ref", "enum", "const"} and k != "stream_options"}
        return body

    any_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4), max_leaves=12)
    extreme = st.sampled_from([0, -1, 1e-39, 1e-300, 1e308, -1e308, 2**63, -(2**63) - 1, 10**40, True, False, "",
                               "1", [], {}, None, 0.5, 2.0000001])
    endpoints = st.sampled_from([("/v1/completions", "CompletionBody"), ("/v1/chat/completions", "ChatBody")])

    @st.composite
    def request(draw):
        path, name = draw(endpoints)
        kind = draw(st.sampled_from(["valid", "typed", "field", "extreme", "unknown", "bytes"]))
        if kind == "bytes":
            return path, draw(st.sampled_from([b"\xff\xfe{", b'{"model": "', b"", b"[]", b"null", b'{"model": 1}',
                                               b'{"prompt": "\xc3\x28"}'])) + draw(st.binary(max_size=16))
        body = draw(from_schema(body_schema(name, short=kind != "typed"), components, any_json))
        fields = sorted(components[name]["properties"])
        if kind == "field":
            body[draw(st.sampled_from(fields))] = draw(any_json)
        elif kind == "extreme":
            for f in draw(st.lists(st.sampled_from(["temperature", "top_p", "top_k", "seed", "max_tokens", "n",
                                                    "stop", "stream"]), min_size=1, max_size=3)):
                body[f] = draw(extreme)
        elif kind == "unknown":
            body[draw(st.text(min_size=1, max_size=12))] = draw(any_json)
        return path, json.dumps(body).encode()
    return request()


def fuzz(url: str, examples: int, api_key: str | None = None, seed: int = 0, timeout: float = 120) -> dict:
    """Send ``examples`` generated requests; raise AssertionError on the first unacceptable answer.

    Returns the count of answers by status, and the server's health afterwards."""
    import requests
    from hypothesis import HealthCheck, given, seed as hseed, settings

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    schema = requests.get(f"{url}/openapi.json", timeout=30).json()
    model = requests.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    statuses: collections.Counter = collections.Counter()

    @hseed(seed)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(_strategies(schema, model))
    def one(case):
        path, data = case
        r = requests.post(f"{url}{path}", data=data, timeout=timeout,
                          headers={**headers, "Content-Type": "application/json"})
        statuses[r.status_code] += 1
        streamed = b'"stream": true' in data
        problem = check_answer(r.status_code, r.headers.get("content-type", ""), r.text, streamed)
        assert problem is None, f"{path} {data[:300]!r}: {problem}"
    one()
    health = requests.get(f"{url}/health", timeout=30).status_code
    return {"requests": sum(statuses.values()), "statuses": dict(sorted(statuses.items())), "health": health}


def main(argv: list[str] | None = None) -> int:
    import os
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--examples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--api-key", default=os.environ.get("DS_SPD_API_KEY"))
    args = ap.parse_args(argv)
    result = fuzz(args.url, args.examples, args.api_key, args.seed)
    print(json.dumps(result), flush=True)
    return 0 if result["health"] == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
