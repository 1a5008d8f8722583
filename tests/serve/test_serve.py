"""``ds-spd serve``: continuous batching proved by equality, and a real 2-rank server driven by the clients people
use (the ``openai`` package, curl, raw HTTP), with faults injected by killing real processes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import requests
import pytest
import torch
from helpers import ROOT, assert_no_shm_left, cli_json, run_cli, shm_buffers
from serve_helpers import API_KEY, AUTH, PROMPTS, SPD, ServerProcess, post, wait_gone

from ds_spd.serve.sampling import SamplingParams



# ---------------------------------------------------------------- in process: the batching itself
def test_non_streamed_answer_survives_a_wait_longer_than_the_disconnect_poll():
    """The non-streamed path polls for a gone client once a second; a first token that takes longer (a queue, a
    long prefill) must not end the answer early."""
    import asyncio

    from ds_spd.serve.serving import _collect
    from ds_spd.serve.state import Delta, LiveRequest, ServeState
    from ds_spd.serve.metrics import ServeMetrics

    class StillConnected:
        async def is_disconnected(self):
            return False

    async def main():
        state = ServeState("tiny", None, 64, ServeMetrics(0, 4, 2))
        req = LiveRequest("cmpl-1", "completion", [[1, 2]], 1, SamplingParams(max_tokens=2),
                          asyncio.get_running_loop())
        state.live[req.id] = req
        loop = asyncio.get_running_loop()
        loop.call_later(1.6, req.push, ("delta", Delta(0, "ab", None, 1)))
        loop.call_later(1.7, req.push, ("delta", Delta(0, "c", "length", 2)))
        return json.loads((await _collect(state, req, StillConnected())).body)
    body = asyncio.run(main())
    assert body["choices"][0]["text"] == "abc" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


# ---------------------------------------------------------------- a real server on 2 ranks


@pytest.fixture(scope="module")
def server(chat_dir, tmp_path_factory):
    """The shared 2-rank server: API key from the environment, 8 running + 24 waiting sequences at most."""
    log = tmp_path_factory.mktemp("serve_tokens")
    srv = ServerProcess(["--model", chat_dir, *SPD, "--enforce-eager", "--token-log", str(log),
                         "--served-model-name", "tiny", "--max-seqs", "8", "--max-queue", "24",
                         "--shutdown-timeout", "120"],
                        env={"DS_SPD_API_KEY": API_KEY})
    srv.token_log = str(log)
    yield srv
    srv.kill()


def _client(server, api_key=API_KEY):
    from openai import OpenAI
    return OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=120)


def _openai_error(r, status: int) -> dict:
    """The body of an error answer, checked to be OpenAI's shape with this status."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text
    return err


@pytest.mark.multirank
def test_greedy_through_server_equals_generate(server, chat_dir, capsys):
    """One request, then 8 concurrent ones: the server's greedy text equals `ds-spd generate`'s for each prompt."""
    gen = cli_json(["generate", "--virtual-tp", "2", "--model", chat_dir, *SPD, "--prompt", *PROMPTS,
                    "--max-new-tokens", "12"], capsys)
    expected = [g["completion"] for g in gen["generations"]]
    client = _client(server)
    one = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert one.choices[0].text == expected[0]
    results = [None] * len(PROMPTS)

    def ask(i):
        results[i] = client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=12, temperature=0)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.choices[0].text for r in results] == expected
    assert all(r.usage.completion_tokens == len(g["token_ids"]) for r, g in zip(results, gen["generations"]))


@pytest.mark.multirank
def test_openai_client_chat_stream_n_stop_models(server):
    client = _client(server)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason in ("length", "stop")
    assert chat.usage.prompt_tokens > 0 and chat.usage.completion_tokens <= 6
    # streaming chat: the deltas join to the non-streamed answer, then a usage chunk, then [DONE]
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens and not chunks[-1].choices
    # n > 1 with a seed: n different choices, reproducible
    a = client.completions.create(model="tiny", prompt="def main", max_tokens=8, n=3, temperature=1.0, seed=11)
    b = client.completions.create(model="tiny", prompt="def main", max_tokens=8, n=3, temperature=1.0, seed=11)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1
    assert a.usage.completion_tokens == 24
    # stop strings: the text ends before the stop string; finish_reason "stop"
    full = client.completions.create(model="tiny", prompt="def main", max_tokens=16, temperature=0).choices[0].text
    stop = full[4:7]
    cut = client.completions.create(model="tiny", prompt="def main", max_tokens=16, temperature=0, stop=[stop, "zzz"])
    assert cut.choices[0].text == full[:full.find(stop)] and cut.choices[0].finish_reason == "stop"


@pytest.mark.multirank
def test_curl_streams_sse_ending_done(server):
    body = json.dumps({"model": "tiny", "prompt": "def main", "max_tokens": 5, "temperature": 0, "stream": True})
    out = subprocess.run(["curl", "-sN", f"{server.url}/v1/completions", "-H", "Content-Type: application/json",
                          "-H", f"Authorization: Bearer {API_KEY}", "-d", body], capture_output=True, text=True,
                         timeout=60).stdout
    events = [line[len("data: "):] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    ref = post(server, "/v1/completions", {"model": "tiny", "prompt": "def main", "max_tokens": 5,
                                            "temperature": 0}).json()
    assert "".join(c["choices"][0]["text"] for c in chunks) == ref["choices"][0]["text"]
    assert subprocess.run(["curl", "-sf", f"{server.url}/health"], capture_output=True).returncode == 0


@pytest.mark.multirank
def test_new_request_is_served_while_a_long_one_runs(server):
    """Continuous batching: a request sent while a long generation streams gets its answer before that ends."""
    client = _client(server)
    times = {}

    def long_stream():
        stream = client.completions.create(model="tiny", prompt="def main", max_tokens=300, temperature=0,
                                           stream=True)
        for i, _ in enumerate(stream):
            times.setdefault("long_first", time.monotonic())
        times["long_end"] = time.monotonic()
    t = threading.Thread(target=long_stream)
    t.start()
    while "long_first" not in times:
        time.sleep(0.01)
    short = client.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0)
    times["short_end"] = time.monotonic()
    t.join()
    assert short.choices[0].finish_reason == "length"
    assert times["short_end"] < times["long_end"], times


BAD_REQUESTS = [  # (body or raw text, the param named in the error)
    ({"model": "tiny", "prompt": "a", "max_tokens": 100000}, "max_tokens"),
    ({"model": "nope", "prompt": "a"}, "model"),
    ({"model": "tiny", "prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "prompt": "a", "temperature": -0.5}, "temperature"),
    ({"model": "tiny", "prompt": "a", "logprobs": 21}, "logprobs"),
    ({"model": "tiny", "prompt": "a", "best_of": 2}, "best_of"),                    # not honoured: refused
    ({"model": "tiny", "prompt": "a", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"model": "tiny", "prompt": "a", "presence_penalty": 3}, "presence_penalty"),
    ({"model": "tiny", "prompt": "a", "frobnicate": 1}, "frobnicate"),
    ({"model": "tiny"}, "prompt"),
    ({"model": "tiny", "prompt": ""}, "prompt"),
    ('{"model": "tiny", "prompt": ', None),
    (b'{"model": "tiny", "prompt": "\xff\xfe"}', None),                           # not UTF-8
    ('{"model": "tiny", "prompt": "a", "seed": ' + "9" * 5000 + "}", None),        # past any integer parser
    ({"model": "tiny", "prompt": "a", "seed": 2**64}, "seed"),
    ({"model": "tiny", "prompt": "a", "max_tokens": True}, "max_tokens"),           # booleans are not numbers
    ({"model": "tiny", "prompt": "a", "n": True}, "n"),
    ({"model": "tiny", "prompt": "a", "temperature": True}, "temperature"),
    ({"model": "tiny", "prompt": [1, True]}, "prompt"),
    ({"model": "tiny", "prompt": ["a"] * 100}, "prompt"),                           # more than batch + queue
]


@pytest.mark.multirank
def test_bad_requests_get_400_and_leave_others_alone(server):
    ref = post(server, "/v1/completions", {"model": "tiny", "prompt": "def main", "max_tokens": 40,
                                            "temperature": 0}).json()["choices"][0]["text"]
    result = {}

    def running():
        result["text"] = post(server, "/v1/completions", {"model": "tiny", "prompt": "def main", "max_tokens": 40,
                                                           "temperature": 0}).json()["choices"][0]["text"]
    t = threading.Thread(target=running)
    t.start()
    for body, param in BAD_REQUESTS:
        if isinstance(body, (str, bytes)):
            r = requests.post(f"{server.url}/v1/completions", data=body,
                              headers={"content-type": "application/json", **AUTH}, timeout=30)
        else:
            r = post(server, "/v1/completions", body, timeout=30)
        err = _openai_error(r, 400)
        assert err["type"] == "invalid_request_error" and err["param"] == param, (body, err)
    chat = post(server, "/v1/chat/completions", {"model": "tiny", "messages": [], "max_tokens": 2})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    # the framework's own answers are OpenAI's shape too
    assert _openai_error(requests.get(f"{server.url}/v1/completions", headers=AUTH, timeout=30), 405)["code"] == \
        "method_not_allowed"
    assert _openai_error(requests.get(f"{server.url}/v1/nope", headers=AUTH, timeout=30), 404)["code"] == "not_found"
    t.join()
    assert result["text"] == ref   # the request in flight was not disturbed


def _metric(server, name: str) -> float:
    for line in requests.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not found")


@pytest.mark.multirank
def test_extreme_sampling_values_are_normalised_not_fatal(server):
    """A temperature that overflows the logits (1e-39) or a top_p that keeps nothing (1e-300) once killed every
    rank; now both are greedy, as the sampler keeps the best token, and the server stays healthy."""
    greedy = post(server, "/v1/completions", {"model": "tiny", "prompt": "def main", "max_tokens": 6,
                                               "temperature": 0}).json()["choices"][0]["text"]
    for extreme in ({"temperature": 1e-39}, {"temperature": 0.5, "top_p": 1e-300}, {"temperature": 2, "top_k": 1},
                    {"temperature": 1e-300, "top_p": 1e-300, "top_k": 1, "seed": -(2**63)}):
        r = post(server, "/v1/completions", {"model": "tiny", "prompt": "def main", "max_tokens": 6, **extreme})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy, (extreme, r.text)
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200


@pytest.mark.multirank
def test_api_key_guards_v1_and_leaves_health_and_metrics_open(server):
    from openai import AuthenticationError
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = requests.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "a"}, headers=headers,
                          timeout=30)
        assert _openai_error(r, 401)["code"] == "invalid_api_key"
    assert _openai_error(requests.get(f"{server.url}/v1/models", timeout=30), 401)
    with pytest.raises(AuthenticationError):
        _client(server, api_key="wrong").models.list()
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200
    assert requests.get(f"{server.url}/metrics", timeout=30).status_code == 200


@pytest.mark.multirank
def test_large_bodies_are_refused_without_stalling_anyone(server):
    """A body over --max-request-mb gets 413 before it is read whole (declared or chunked); the largest body
    allowed is parsed off the event loop: /health keeps answering and a running stream keeps streaming. Memory
    comes back."""
    import psutil
    rank0 = psutil.Process(server.rank_pids()[0])
    gaps, health, done = [], [], threading.Event()

    def stream():
        last = time.monotonic()
        with requests.post(f"{server.url}/v1/completions", headers=AUTH, stream=True, timeout=120, json={
                "model": "tiny", "prompt": "def main", "max_tokens": 150, "temperature": 0, "ignore_eos": True,
                "stream": True}) as r:
            for line in r.iter_lines():
                if line:
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now
        done.set()

    def poll():
        while not done.is_set():
            start = time.monotonic()
            assert requests.get(f"{server.url}/health", timeout=30).status_code == 200
            health.append(time.monotonic() - start)
            time.sleep(0.05)
    threads = [threading.Thread(target=stream), threading.Thread(target=poll)]
    rss_before = rank0.memory_info().rss
    for t in threads:
        t.start()
    while not gaps:
        time.sleep(0.01)
    start = time.monotonic()
    huge = post(server, "/v1/completions", None, data=b"x" * (50 * 2**20), headers={"content-type": "application/json"})
    assert _openai_error(huge, 413)["code"] == "request_too_large" and time.monotonic() - start < 5
    chunked = requests.post(f"{server.url}/v1/completions", data=(b"y" * 2**20 for _ in range(8)), timeout=60,
                            headers={"content-type": "application/json", **AUTH})
    assert _openai_error(chunked, 413)["code"] == "request_too_large"
    largest = json.dumps({"model": "tiny", "prompt": [1] * 1_300_000}).encode()   # 3.9 MB of token ids: allowed
    assert len(largest) < 4 * 2**20
    for _ in range(3):
        assert _openai_error(post(server, "/v1/completions", None, data=largest,
                                   headers={"content-type": "application/json"}), 400)["code"] == \
            "context_length_exceeded"
    for t in threads:
        t.join()
    # before: a 10-50 MB body held /health and the streams for 36-74 s (a 9 MB one: 10.7 s). The aim is 1 s
    # (measured here, quiet: 33 ms, docs/serving.md); a test machine running other launches beside this one
    # starves every process now and then (a 2.9 s stream gap seen with /health at 0.5 s), hence 5 s
    assert max(health) < 5.0 and max(gaps) < 5.0, (max(health), max(gaps))
    assert rank0.memory_info().rss - rss_before < 200 * 2**20


@pytest.mark.multirank
def test_full_queue_answers_429_with_retry_after(server):
    """8 running + 24 waiting sequences at most: two n=16 streams fill them, the next request gets 429."""
    streams = [requests.post(f"{server.url}/v1/completions", headers=AUTH, stream=True, timeout=120, json={
        "model": "tiny", "prompt": "def main", "max_tokens": 400, "n": 16, "temperature": 1.0, "ignore_eos": True,
        "stream": True}) for _ in range(2)]
    try:
        for r in streams:
            assert r.status_code == 200
        over = post(server, "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2})
        assert _openai_error(over, 429)["type"] == "rate_limit_error" and over.headers["Retry-After"] == "1"
    finally:
        for r in streams:
            r.close()
    deadline = time.monotonic() + 20
    while _metric(server, "ds_spd:num_requests_running") + _metric(server, "ds_spd:num_requests_waiting") > 0:
        assert time.monotonic() < deadline, "the closed streams still hold their sequences"
        time.sleep(0.1)


@pytest.mark.multirank
def test_fuzzed_requests_get_openai_answers_and_the_server_survives(server, chat_dir):
    """Hypothesis: 60 bodies from the server's own OpenAPI schema and hostile variants of them (any JSON in any
    field, extreme numbers, unknown fields, broken bytes); every answer a 200 or an OpenAI-shaped 4xx; then the
    server is healthy and greedy output is unchanged (docs/serving.md has a 3000-request run)."""
    from ds_spd.tools.fuzz_serve import fuzz
    before = post(server, "/v1/completions", {"model": "tiny", "prompt": "def main", "max_tokens": 8,
                                               "temperature": 0}).json()["choices"][0]["text"]
    result = fuzz(server.url, 60, API_KEY, seed=0)
    assert result["health"] == 200 and result["requests"] >= 60
    assert result["statuses"].get(200, 0) > 10 and set(result["statuses"]) <= {200, 400, 404, 413, 429}
    after = post(server, "/v1/completions", {"model": "tiny", "prompt": "def main", "max_tokens": 8,
                                              "temperature": 0}).json()["choices"][0]["text"]
    assert after == before


@pytest.mark.multirank
def test_schemathesis_finds_the_published_schema_true(server):
    """Schemathesis, every check, against the shared server's own /openapi.json: bodies valid under the schema
    (accepted, or refused only for a joint limit no schema states, by its documented code) and bodies that
    violate it (refused), each answer's status, content type, headers and body as the schema documents them,
    the bearer key enforced. A dozen examples per operation and mode, derandomized (the hostile bytes are
    the fuzz test's)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    from ds_spd.serve.openapi import JOINT_LIMIT_CODES
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    session, seen = requests.Session(), {}
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, *([GenerationMode.NEGATIVE] if op.method.upper() == "POST" else [])):
            @settings(max_examples=12, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                response = case.call(base_url=server.url, headers=AUTH, session=session, timeout=120)
                seen.setdefault(op.label, set()).add(response.status_code)
                joint = response.status_code == 400 and response.json()["error"]["code"] in JOINT_LIMIT_CODES
                case.validate_response(response, headers=AUTH, excluded_checks=[positive_data_acceptance] if joint else None)
            check()
    assert {200, 400} <= seen["POST /v1/completions"] and {200, 400} <= seen["POST /v1/chat/completions"], seen
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200


def _model_logprobs(chat_dir, ids: list[int]) -> torch.Tensor:
    """The tiny model's own log-probabilities ``[len(ids), V]`` with the server's SPD blocks, in one process."""
    import ds_spd
    from transformers import AutoModelForCausalLM
    model = ds_spd.virtualize(AutoModelForCausalLM.from_pretrained(chat_dir, dtype=torch.float32).eval(), 2, [0, 2])
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


@pytest.mark.multirank
def test_echo_logprobs_through_the_server_equal_the_models_own(server, chat_dir):
    """What lm-evaluation-harness's local-completions sends for loglikelihood (echo, logprobs, max_tokens 1): the
    prompt's log-probabilities through the 2-rank server equal the model's own, the first is null, the
    generated token's too; streamed (from the prefix cache) the same; chat's logprobs / top_logprobs through the openai client."""
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(chat_dir)("def main(x): return x + 1").input_ids
    ref = _model_logprobs(chat_dir, ids)
    expected = [float(ref[j, ids[j + 1]]) for j in range(len(ids) - 1)]
    body = {"model": "tiny", "prompt": ids, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 3}
    choice = post(server, "/v1/completions", body).json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:len(ids)] == pytest.approx(expected, abs=1e-4)
    assert lp["token_logprobs"][-1] == pytest.approx(float(ref[-1].max()), abs=1e-4)   # greedy: the best token
    assert max(lp["top_logprobs"][-1].values()) == pytest.approx(float(ref[-1].max()), abs=1e-4)
    assert choice["text"].startswith(AutoTokenizer.from_pretrained(chat_dir).decode(ids))
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    with requests.post(f"{server.url}/v1/completions", json={**body, "stream": True}, headers=AUTH, stream=True,
                       timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True) if line.startswith("data: {")]
    streamed = [v for c in chunks for v in (c["choices"][0]["logprobs"] or {}).get("token_logprobs", [])]
    # sent again, the prompt is reused from the prefix cache: its last token is recomputed in a 1-token forward
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp["token_logprobs"][1:], abs=1e-4)
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    chat = _client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-5) for c in content)   # greedy


@pytest.mark.multirank
def test_prefix_cache_through_the_server(server, chat_dir, capsys):
    """Prompts behind one system text, in turn and 4 at once, and a chat's turns: each reports the prompt tokens it
    reused (usage.prompt_tokens_details.cached_tokens, through the openai client), its greedy text equals
    `ds-spd generate`'s, /metrics counts the hits."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(chat_dir)
    system = "while True pass lambda x return the class of def main import os and sys and then x y z " * 2
    prompts = [system + p for p in PROMPTS]
    gen = cli_json(["generate", "--virtual-tp", "2", "--model", chat_dir, *SPD, "--prompt", *prompts,
                    "--max-new-tokens", "8"], capsys)
    expected = [g["completion"] for g in gen["generations"]]
    client, shared = _client(server), len(tok(system).input_ids) - 2
    first = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=8, temperature=0)
    second = client.completions.create(model="tiny", prompt=prompts[1], max_tokens=8, temperature=0)
    assert [first.choices[0].text, second.choices[0].text] == expected[:2]
    assert first.usage.prompt_tokens_details.cached_tokens < shared <= second.usage.prompt_tokens_details.cached_tokens
    results = [None] * 4

    def ask(i):
        results[i] = client.completions.create(model="tiny", prompt=prompts[4 + i], max_tokens=8, temperature=0)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.choices[0].text for r in results] == expected[4:]
    assert all(r.usage.prompt_tokens_details.cached_tokens >= shared for r in results)
    turns = [{"role": "system", "content": system}, {"role": "user", "content": "def main"}]
    one = client.chat.completions.create(model="tiny", messages=turns, max_tokens=6, temperature=0)
    turns += [{"role": "assistant", "content": one.choices[0].message.content}, {"role": "user", "content": "x"}]
    two = client.chat.completions.create(model="tiny", messages=turns, max_tokens=6, temperature=0)
    # the second turn resends the first: at least its prompt is reused (the tokens of the reply too, where the
    # template tokenizes them as they were generated)
    assert two.usage.prompt_tokens_details.cached_tokens >= one.usage.prompt_tokens - 2
    metrics = requests.get(f"{server.url}/metrics", timeout=10).text
    hits = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("ds_spd:prefix_cache_hits")))
    assert hits >= 5 * shared and "ds_spd:prefix_cache_hit_rate" in metrics


@pytest.mark.multirank
def test_bias_penalties_and_min_tokens_change_what_they_should(server, chat_dir):
    """logit_bias forces or bars a token; min_tokens holds end-of-sequence back; the penalties change greedy
    output, streamed and not (their arithmetic: test_sampling_adjustments_are_vllms)."""
    client = _client(server)
    from transformers import AutoTokenizer
    greedy = post(server, "/v1/completions", {"model": "tiny", "prompt": "def main", "max_tokens": 1,
                                               "temperature": 0, "logprobs": 1}).json()["choices"][0]
    first = max(greedy["logprobs"]["top_logprobs"][0], key=greedy["logprobs"]["top_logprobs"][0].get)
    forced = 7
    r = client.completions.create(model="tiny", prompt="def main", max_tokens=5, temperature=0,
                                  extra_body={"logit_bias": {str(forced): 100}, "ignore_eos": True}, logprobs=0)
    tok = AutoTokenizer.from_pretrained(chat_dir)
    assert r.choices[0].logprobs.tokens == [tok.decode([forced])] * 5
    best = int(_model_logprobs(chat_dir, tok("def main").input_ids)[-1].argmax())
    assert tok.decode([best]) == first
    barred = client.completions.create(model="tiny", prompt="def main", max_tokens=1, temperature=0, logprobs=0,
                                       logit_bias={str(best): -100})
    # another token (the model's own log-probability is reported, before the bias: the second best's is lower)
    assert barred.choices[0].logprobs.token_logprobs[0] < greedy["logprobs"]["token_logprobs"][0]
    from transformers import AutoConfig
    eos = {str(AutoConfig.from_pretrained(chat_dir).eos_token_id): 100}   # the model's end-of-sequence, as generate's
    assert client.completions.create(model="tiny", prompt="a", max_tokens=20, temperature=0,
                                     logit_bias=eos).usage.completion_tokens == 1
    held = client.completions.create(model="tiny", prompt="a", max_tokens=20, temperature=0, logit_bias=eos,
                                     extra_body={"min_tokens": 5})
    assert held.usage.completion_tokens == 6 and held.choices[0].finish_reason == "stop"
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 5.0}):
        plain = client.completions.create(model="tiny", prompt="def main", max_tokens=24, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text
        stream = client.completions.create(model="tiny", prompt="def main", max_tokens=24, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True, **penalty})
        penalised = "".join(c.choices[0].text for c in stream)
        assert penalised != plain, penalty


@pytest.mark.multirank
def test_client_disconnect_frees_its_slot(server):
    with requests.post(f"{server.url}/v1/completions", headers=AUTH, timeout=60, stream=True,
                       json={"model": "tiny", "prompt": "def main", "max_tokens": 400, "temperature": 0,
                             "stream": True}) as r:
        lines = r.iter_lines(decode_unicode=True)
        next(line for line in lines if line.startswith("data: "))
        assert _metric(server, "ds_spd:num_requests_running") == 1
    deadline = time.monotonic() + 10   # the client is gone: its sequence leaves at the next step
    while _metric(server, "ds_spd:num_requests_running") != 0:
        assert time.monotonic() < deadline, "the disconnected stream still holds its slot"
        time.sleep(0.05)
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    assert 'ds_spd:allreduce_calls_total{kind="spd"}' in text and "ds_spd:spd_blocks 2.0" in text
    assert "ds_spd:time_to_first_token_seconds_bucket" in text


@pytest.mark.multirank
def test_soak_mixed_requests_no_failures_flat_rss(server):
    """300 mixed requests (completions, chat, streaming, n > 1, stops) at 8 concurrent: none fails, and the
    ranks' resident memory after the second half is within 16 MiB of after the first."""
    import psutil
    from concurrent.futures import ThreadPoolExecutor
    client = _client(server)
    pids = server.rank_pids()
    assert sorted(pids) == [0, 1]

    def one(i):
        kind = i % 4
        if kind == 0:
            r = client.completions.create(model="tiny", prompt=PROMPTS[i % 8], max_tokens=1 + i % 7,
                                          temperature=0.8, seed=i)
            return r.choices[0].finish_reason
        if kind == 1:
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[i % 8]}],
                                               max_tokens=4, temperature=0)
            return r.choices[0].finish_reason
        if kind == 2:
            s = client.completions.create(model="tiny", prompt=PROMPTS[i % 8], max_tokens=5, stream=True,
                                          temperature=0)
            return [c.choices[0].finish_reason for c in s if c.choices][-1]
        r = client.completions.create(model="tiny", prompt=PROMPTS[i % 8], max_tokens=3, n=2, stop=["e"],
                                      temperature=1.0)
        return r.choices[-1].finish_reason

    def rss():
        return sum(psutil.Process(p).memory_info().rss for p in pids.values())
    with ThreadPoolExecutor(8) as pool:
        first = list(pool.map(one, range(150)))
        mid = rss()
        second = list(pool.map(one, range(150, 300)))
    assert all(r in ("stop", "length") for r in first + second)
    assert rss() - mid < 16 * 2**20, (mid, rss())


@pytest.mark.multirank
def test_bench_serve_against_a_running_server(server, chat_dir, tmp_path):
    """`ds-spd bench-serve --url`: every request completes, and the client-side figures are consistent."""
    out = tmp_path / "bs"
    run_cli(["bench-serve", "--url", server.url, "--api-key", API_KEY, "--model", chat_dir, "--num-requests", "6",
             "--rates", "inf,20",
             "--concurrency", "2", "--repeats", "1", "--prompt-len", "8,24", "--output-len", "6", "--out", str(out)])
    result = json.load(open(out / "bench_serve.json"))
    assert {r["load_name"] for r in result["runs"]} == {"rate inf", "rate 20", "rate inf, concurrency 2"}
    for r in result["runs"]:
        assert r["completed"] == 6 and r["failed"] == 0 and r["total_output_tokens"] == 36   # ignore_eos
        assert 0 < r["ttft"]["p50_ms"] <= r["e2el"]["p50_ms"] and r["tpot"]["p50_ms"] > 0
        assert 0 < r["decode_forward_ms"] < r["e2el"]["p50_ms"]   # the engine's decode forwards, from /metrics
    assert (out / "bench_serve.png").stat().st_size > 0 and "TPOT p50" in (out / "bench_serve.md").read_text()


@pytest.mark.multirank
def test_lm_eval_local_completions_against_the_server_equals_the_in_process_adapter(server, chat_dir, monkeypatch):
    """lm-evaluation-harness's own `local-completions` model, pointed at the 2-rank server (echo + logprobs, the
    API key from OPENAI_API_KEY as lm_eval reads it), scores the offline task as the in-process adapter does."""
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from ds_spd.tools.lm_eval_adapter import SPDLM
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    tasks = TaskManager(include_path=os.path.join(ROOT, "tests/data/lm_eval"))
    served = simple_evaluate(model="local-completions", tasks=["ds_spd_tiny_choice"], task_manager=tasks,
                             model_args={"base_url": f"{server.url}/v1/completions", "model": "tiny",
                                         "tokenizer": chat_dir, "tokenizer_backend": "huggingface",
                                         "num_concurrent": 1, "max_retries": 1}, log_samples=True)
    local = simple_evaluate(model=SPDLM(model=chat_dir, virtual_tp=2, spd_blocks="0,2", batch_size=2),
                            tasks=["ds_spd_tiny_choice"], task_manager=tasks, log_samples=True)
    assert served["results"]["ds_spd_tiny_choice"]["acc,none"] == local["results"]["ds_spd_tiny_choice"]["acc,none"]
    ll = {r["doc_id"]: [x[0][0] for x in r["resps"]] for r in served["samples"]["ds_spd_tiny_choice"]}
    ref = {r["doc_id"]: [x[0][0] for x in r["resps"]] for r in local["samples"]["ds_spd_tiny_choice"]}
    assert sorted(ll) == sorted(ref) and len(ll) == 6
    for doc in ref:
        assert ll[doc] == pytest.approx(ref[doc], abs=1e-3)


@pytest.mark.multirank
def test_a_second_server_shares_the_host_ctrl_c_drains_and_sigterm_stops_now(server, chat_dir):
    """A second `launch/tp.sh 2 serve` beside the shared one (each launch draws its own master port; DeepSpeed's
    default 29500 made the second wait and die). With a stream running, Ctrl-C (SIGINT to the terminal's
    foreground group) drains it: /health 503, the stream goes on. Then SIGTERM to the process the user started
    (not its group: a supervisor signals the top process) is the second stop: the stream ends with an error,
    every rank exits, /dev/shm is clean, the launch exits 0, and the shared server still answers (this one runs
    without the prefix cache: its log says so). (A drain that
    runs to completion: the runner test below, on the shared server.)"""
    shm_before = shm_buffers()
    # two slots for the 8 choices: four rounds of 450 steps, so the stream outlasts the 3 s before the second stop
    # on an idle machine too (with 8 slots it could finish in under 3 s)
    second = ServerProcess(["--model", chat_dir, "--enforce-eager", "--served-model-name", "tiny",
                            "--shutdown-timeout", "120", "--no-prefix-cache", "--max-seqs", "2"])
    try:
        pids = second.rank_pids()
        result: dict = {}

        def stream():
            with requests.post(f"{second.url}/v1/completions", stream=True, timeout=120, json={
                    "model": "tiny", "prompt": "def main", "max_tokens": 450, "n": 8, "temperature": 0,
                    "ignore_eos": True, "stream": True}) as r:
                result["chunks"] = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
                                    if line.startswith("data: {")]
        t = threading.Thread(target=stream)
        t.start()
        time.sleep(0.5)
        os.killpg(second.proc.pid, signal.SIGINT)
        deadline = time.monotonic() + 10
        while (health := requests.get(f"{second.url}/health", timeout=5).status_code) != 503 \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health == 503
        time.sleep(2.5)   # past SAME_STOP: the next signal is a second stop, not a copy of the first
        assert t.is_alive(), "the 8 x 450-token stream must still run for the drain to be tested"
        second.signal(signal.SIGTERM)
        t.join()
        code = second.wait_exit(60)
        wait_gone(pids.values(), 40)
        out = second.output()
        assert code == 0, out[-3000:]
        assert "error" in result["chunks"][-1] and "shutting down" in result["chunks"][-1]["error"]["message"]
        assert "launch/tp.sh: SIGINT: SIGTERM to 2 rank(s)" in out and "launch/tp.sh: SIGTERM: SIGTERM to 2" in out
        assert "SIGTERM: stopping (now)" in out and "ds-spd serve: stopped" in out and "prefix cache off" in out
        assert_no_shm_left(shm_before, "a stopped server")
    finally:
        second.kill()
    # the server's temp log (ServerProcess made it) is gone, its text kept in memory
    assert not os.path.exists(second.log_path) and "ds-spd serve: stopped" in second.output()
    assert post(server, "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2}).status_code == 200


@pytest.mark.multirank
def test_sigterm_to_the_deepspeed_runner_drains_and_every_rank_exits(server):
    """Last on this server: SIGTERM to the deepspeed runner alone (it dies without passing it on) mid-generation.
    Rank 0 sees its runner go and drains: /health turns 503, the running request finishes, new ones are refused,
    every rank exits 0 with nothing left in /dev/shm, and every rank ran the same tokens."""
    import psutil
    shm_before = shm_buffers()
    pids = server.rank_pids()
    (runner,) = [p for p in psutil.Process(server.proc.pid).children() if "deepspeed.launcher.runner" in p.cmdline()]
    (launcher,) = runner.children()   # deepspeed.launcher.launch: it reports each rank's exit
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", post(server, "/v1/completions", {
        "model": "tiny", "prompt": "def main", "max_tokens": 450, "n": 8, "temperature": 0, "ignore_eos": True})))
    t.start()
    time.sleep(0.3)
    runner.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10   # the watch polls twice a second; on a loaded machine, give it time
    while (health := requests.get(f"{server.url}/health", timeout=5).status_code) != 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health == 503
    assert t.is_alive(), "the 8 x 450-token request must still be running for the drain to be tested"
    refused = post(server, "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2})
    assert refused.status_code == 503
    t.join()
    assert result["r"].status_code == 200
    assert [c["finish_reason"] for c in result["r"].json()["choices"]] == ["length"] * 8
    wait_gone([*pids.values(), launcher.pid], 60)
    out = server.output()
    assert "the deepspeed runner that started this server is gone" in out and "ds-spd serve: stopped" in out
    assert out.count("exits successfully") == 2, out[-3000:]   # the deepspeed launcher saw both ranks exit 0
    assert_no_shm_left(shm_before, "a drained server")
    logs = [json.load(open(os.path.join(server.token_log, f"tokens_rank{r}.json"))) for r in (0, 1)]
    assert logs[0] == logs[1] and len(logs[0]) >= 8   # the other rank ran exactly rank 0's tokens, every sequence


def test_bench_serve_url_against_transformers_serve(chat_dir, tmp_path):
    """`bench-serve --url` against another OpenAI-compatible server: `transformers serve` refuses token-id prompts
    and vLLM's ignore_eos (HTTP 422 for every request before); the probe finds that it takes text prompts, and
    every request completes with the tokens it returned."""
    import shutil
    from helpers import free_port
    exe = shutil.which("transformers", path=os.path.dirname(sys.executable))
    port = free_port()
    proc = subprocess.Popen([exe, "serve", "--port", str(port), chat_dir], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "transformers serve did not start"
            try:
                if requests.get(f"{url}/v1/models", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        out = tmp_path / "bs"
        run_cli(["bench-serve", "--url", url, "--model", chat_dir, "--num-requests", "4", "--rates", "inf",
                 "--repeats", "1", "--prompt-len", "8,16", "--output-len", "4", "--out", str(out)])
        result = json.load(open(out / "bench_serve.json"))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert result["backend"] == {"token_ids": False, "ignore_eos": False, "usage": True}   # OpenAI's fields only
    (run,) = result["runs"]
    assert run["completed"] == 4 and run["failed"] == 0 and 0 < run["total_output_tokens"] <= 16
    assert run["decode_forward_ms"] is None   # no ds_spd metrics there


# ---------------------------------------------------------------- faults on their own servers
