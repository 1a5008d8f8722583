"""``ds-spd serve``: continuous batching proved by equality, and a real 2-rank server driven by the clients people
use (the ``openai`` package, curl, raw HTTP), with faults injected by killing real processes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import requests
import pytest
import torch
from helpers import last_json, run_cli, save_tiny, tiny_model, tiny_tokenizer
from helpers import assert_no_shm_left, shm_buffers
from serve_helpers import ServerProcess, wait_gone

from ds_spd.serve.executor import StepExecutor
from ds_spd.serve.sampling import SamplingParams, generator_for, sample
from ds_spd.serve.scheduler import Scheduler, Sequence

PROMPTS = ["def main", "The class of", "x", "import os and sys and then", "while True: pass", "a b c d e f g",
           "return", "lambda x"]
SPD = ["--spd-blocks", "0,2"]
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


# ---------------------------------------------------------------- in process: the batching itself
def _run_all(model, tok, seqs, slots=4, step_tokens=2048, max_len=256):
    ex = StepExecutor(model, torch.device("cpu"), slots, max_len)
    sched = Scheduler(tok, set(), slots, max_len, step_tokens)
    sched.add(seqs)
    moves = forwards = 0
    while sched.has_work():
        plan = sched.plan()
        if plan is None:
            break
        moves += len(plan["moves"])
        forwards += len(plan["forwards"])
        sched.complete(plan, ex.run(plan))
    return moves, forwards


@pytest.mark.parametrize("step_tokens", [2048, 5])
def test_continuous_batching_greedy_equals_generate(step_tokens):
    """Sequences joining and leaving a batch of 4 slots (different lengths, compaction moves, prefill split
    into 4-token chunks with step_tokens 5) produce exactly HF generate's greedy tokens, prompt by prompt."""
    import ds_spd
    model, tok = ds_spd.virtualize(tiny_model(), 2, [0, 2]), tiny_tokenizer()
    lengths = [20, 5, 13, 20, 2, 9, 17, 11]
    ref = []
    for p, n in zip(PROMPTS, lengths):
        ids = tok(p, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
        ref.append(out[0, ids.shape[1]:].tolist())
    seqs = [Sequence(f"r{i}", 0, tok(p).input_ids, SamplingParams(max_tokens=n, temperature=0))
            for i, (p, n) in enumerate(zip(PROMPTS, lengths))]
    moves, forwards = _run_all(model, tok, seqs, step_tokens=step_tokens)
    assert [s.output for s in seqs] == ref
    assert all(s.finish_reason == "length" for s in seqs)
    assert moves > 0   # sequences finished out of order: the running ones were compacted
    if step_tokens == 5:   # "import os and sys and then" cannot prefill in one step
        assert forwards > _run_all(model, tok, [Sequence("a", 0, tok(PROMPTS[3]).input_ids,
                                                         SamplingParams(max_tokens=2, temperature=0))])[1]


def test_choices_of_one_prompt_share_its_prefill():
    """n > 1: the other choices copy the first one's prompt cache and prefill only the last prompt token; greedy,
    every choice still equals HF generate's tokens."""
    import ds_spd
    model, tok = ds_spd.virtualize(tiny_model(), 2, [0, 2]), tiny_tokenizer()
    prompt = tok(PROMPTS[3]).input_ids
    ids = torch.tensor([prompt])
    ref = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(prompt):]
    ex = StepExecutor(model, torch.device("cpu"), 4, 256)
    sched = Scheduler(tok, set(), 4, 256, 2048)
    seqs = [Sequence("r", i, prompt, SamplingParams(max_tokens=10, temperature=0)) for i in range(3)]
    sched.add(seqs)
    prefilled, forks = 0, 0
    while sched.has_work():
        plan = sched.plan()
        if plan is None:
            break
        forks += sum(length == len(prompt) - 1 for _, _, length in plan["moves"])
        prefilled += sum(len(f["tokens"][0]) for f in plan["forwards"] if f["kind"] == "prefill")
        sched.complete(plan, ex.run(plan))
    assert [s.output for s in seqs] == [ref.tolist()] * 3
    assert forks == 2 and prefilled == len(prompt) + 2


def test_non_streamed_answer_survives_a_wait_longer_than_the_disconnect_poll():
    """The non-streamed path polls for a gone client once a second; a first token that takes longer (a queue, a
    long prefill) must not end the answer early."""
    import asyncio

    from ds_spd.serve.api import LiveRequest, ServeState, _collect
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
        loop.call_later(1.6, req.push, ("delta", 0, "ab", None, 1))
        loop.call_later(1.7, req.push, ("delta", 0, "c", "length", 2))
        return json.loads((await _collect(state, req, StillConnected())).body)
    body = asyncio.run(main())
    assert body["choices"][0]["text"] == "abc" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


def test_paired_serving_ratios_pair_by_repeat():
    from ds_spd.tools.bench_serve import paired_table
    runs = [{"path": "gloo", "load_name": "rate 1", "engine": e, "repeat": k, "output_throughput": 10.0,
             "tpot": {"p50_ms": base * (0.8 if e == "all" else 1.0)}, "ttft": {"p50_ms": 5.0}, "e2el": {"p50_ms": 9.0}}
            for k, base in enumerate([50.0, 70.0, 60.0]) for e in ("tp", "all")]
    (row,) = paired_table(runs)
    assert row["engine"] == "all" and row["tpot"]["ratio"] == pytest.approx(0.8)
    assert row["tpot"]["effect"] == "faster" and row["ttft"]["effect"] == "no effect"


def test_sampling_is_seeded_per_choice_and_filters():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    hot = SamplingParams(max_tokens=1, temperature=1.0, seed=7)
    draw = lambda p, i: [sample(logits, p, g) for g in [generator_for(p.seed, i)] for _ in range(20)]  # noqa: E731
    assert draw(hot, 0) == draw(hot, 0)            # the same seed and choice: the same tokens
    assert draw(hot, 0) != draw(hot, 1)            # another choice of the same request: another stream
    best = int(logits.argmax())
    for p in (SamplingParams(1, temperature=0), SamplingParams(1, temperature=1.5, top_k=1, seed=1),
              SamplingParams(1, temperature=1.0, top_p=1e-6, seed=1)):
        assert set(draw(p, 0)) == {best}
    top3 = set(torch.topk(logits, 3).indices.tolist())
    assert set(draw(SamplingParams(1, temperature=5.0, top_k=3, seed=2), 0)) <= top3


def test_stop_string_is_cut_and_never_streamed():
    tok = tiny_tokenizer()
    ids = tok("the value of x STOP then more text").input_ids
    sched = Scheduler(tok, set(), 2, 128, 64)
    s = Sequence("r", 0, [1], SamplingParams(max_tokens=100, stop=("STOP",)))
    streamed = ""
    for t in ids:
        s.output.append(t)
        streamed += sched._advance(s, t).delta
        assert "STOP"[:2] not in streamed.replace("the value of x", "")
        if s.finished:
            break
    assert s.finish_reason == "stop" and streamed == s.text == "the value of x "


# ---------------------------------------------------------------- a real server on 2 ranks


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    path = save_tiny(str(tmp_path_factory.mktemp("tiny_chat")))
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(chat_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_tokens")
    srv = ServerProcess(["--model", chat_dir, *SPD, "--token-log", str(log), "--served-model-name", "tiny",
                         "--max-seqs", "8"])
    srv.token_log = str(log)
    yield srv
    srv.kill()


def _client(server):
    from openai import OpenAI
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _post(server, path, body, timeout=120):
    return requests.post(f"{server.url}{path}", json=body, timeout=timeout)


@pytest.mark.multirank
def test_greedy_through_server_equals_generate(server, chat_dir):
    """One request, then 8 concurrent ones: the server's greedy text equals `ds-spd generate`'s for each prompt."""
    gen = last_json(run_cli(["generate", "--virtual-tp", "2", "--model", chat_dir, *SPD, "--prompt", *PROMPTS,
                             "--max-new-tokens", "12", "--json"]).stdout)
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
                          "-d", body], capture_output=True, text=True, timeout=60).stdout
    events = [line[len("data: "):] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    ref = _post(server, "/v1/completions", {"model": "tiny", "prompt": "def main", "max_tokens": 5,
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
    ({"model": "tiny", "prompt": "a", "logprobs": 3}, "logprobs"),
    ({"model": "tiny", "prompt": "a", "frobnicate": 1}, "frobnicate"),
    ({"model": "tiny"}, "prompt"),
    ({"model": "tiny", "prompt": ""}, "prompt"),
    ('{"model": "tiny", "prompt": ', None),
]


@pytest.mark.multirank
def test_bad_requests_get_400_and_leave_others_alone(server):
    ref = _post(server, "/v1/completions", {"model": "tiny", "prompt": "def main", "max_tokens": 40,
                                            "temperature": 0}).json()["choices"][0]["text"]
    result = {}

    def running():
        result["text"] = _post(server, "/v1/completions", {"model": "tiny", "prompt": "def main", "max_tokens": 40,
                                                           "temperature": 0}).json()["choices"][0]["text"]
    t = threading.Thread(target=running)
    t.start()
    for body, param in BAD_REQUESTS:
        if isinstance(body, str):
            r = requests.post(f"{server.url}/v1/completions", data=body,
                           headers={"content-type": "application/json"}, timeout=30)
        else:
            r = _post(server, "/v1/completions", body, timeout=30)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert err["param"] == param and err["message"], (body, err)
    chat = _post(server, "/v1/chat/completions", {"model": "tiny", "messages": [], "max_tokens": 2})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    t.join()
    assert result["text"] == ref   # the request in flight was not disturbed


def _metric(server, name: str) -> float:
    for line in requests.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not found")


@pytest.mark.multirank
def test_client_disconnect_frees_its_slot(server):
    with requests.post(f"{server.url}/v1/completions", timeout=60, stream=True,
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
    run_cli(["bench-serve", "--url", server.url, "--model", chat_dir, "--num-requests", "6", "--rates", "inf,20",
             "--concurrency", "2", "--repeats", "1", "--prompt-len", "8,24", "--output-len", "6", "--out", str(out)])
    result = json.load(open(out / "bench_serve.json"))
    assert {r["load_name"] for r in result["runs"]} == {"rate inf", "rate 20", "rate inf, concurrency 2"}
    for r in result["runs"]:
        assert r["completed"] == 6 and r["failed"] == 0 and r["total_output_tokens"] == 36   # ignore_eos
        assert 0 < r["ttft"]["p50_ms"] <= r["e2el"]["p50_ms"] and r["tpot"]["p50_ms"] > 0
        assert 0 < r["decode_forward_ms"] < r["e2el"]["p50_ms"]   # the engine's decode forwards, from /metrics
    assert (out / "bench_serve.png").stat().st_size > 0 and "TPOT p50" in (out / "bench_serve.md").read_text()


@pytest.mark.multirank
def test_sigterm_drains_and_every_rank_exits(server):
    """Last on this server: SIGTERM to rank 0 mid-generation. /health turns 503, the running request finishes,
    new ones are refused, every rank exits 0 with nothing left in /dev/shm, and every rank ran the same tokens."""
    shm_before = shm_buffers()
    pids = server.rank_pids()
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", _post(server, "/v1/completions", {
        "model": "tiny", "prompt": "def main", "max_tokens": 200, "temperature": 0})))
    t.start()
    time.sleep(0.3)
    os.kill(pids[0], signal.SIGTERM)
    deadline = time.monotonic() + 10   # the handler runs between two steps: on a loaded machine, not within 0.2 s
    while (health := requests.get(f"{server.url}/health", timeout=5).status_code) != 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health == 503
    assert t.is_alive(), "the 200-token request must still be running for the drain to be tested"
    refused = _post(server, "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2})
    assert refused.status_code == 503
    t.join()
    assert result["r"].status_code == 200 and result["r"].json()["choices"][0]["finish_reason"] == "length"
    assert server.wait_exit(60) == 0, server.output()[-3000:]
    assert_no_shm_left(shm_before, "a drained server")
    logs = [json.load(open(os.path.join(server.token_log, f"tokens_rank{r}.json"))) for r in (0, 1)]
    assert logs[0] == logs[1] and len(logs[0]) > 300   # the other rank ran exactly rank 0's tokens, every sequence


# ---------------------------------------------------------------- faults on their own servers
@pytest.mark.multirank
def test_killed_rank_fails_pending_with_503_and_all_exit(chat_dir):
    srv = ServerProcess(["--model", chat_dir, *SPD, "--served-model-name", "tiny", "--exit-linger", "3"])
    try:
        pids = srv.rank_pids()
        result = {}

        def pending():
            result["r"] = _post(srv, "/v1/completions", {"model": "tiny", "prompt": "def main", "max_tokens": 400,
                                                         "temperature": 0})
        t = threading.Thread(target=pending)
        t.start()
        time.sleep(0.5)
        start = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)
        t.join(timeout=30)
        assert result["r"].status_code == 503 and "rank 1 died" in result["r"].json()["error"]["message"]
        assert requests.get(f"{srv.url}/health", timeout=5).status_code == 503
        srv.wait_exit(60)
        assert time.monotonic() - start < 30
        wait_gone(pids.values(), 30 - (time.monotonic() - start))
    finally:
        srv.kill()


@pytest.mark.multirank
def test_ctrl_c_on_the_process_group_stops_every_rank(chat_dir):
    """Ctrl-C in a terminal reaches the launcher and every rank: rank 0 decides, all exit, /dev/shm is clean."""
    shm_before = shm_buffers()
    srv = ServerProcess(["--model", chat_dir, "--served-model-name", "tiny"])
    try:
        pids = srv.rank_pids()
        assert _post(srv, "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 3}).status_code == 200
        os.killpg(srv.proc.pid, signal.SIGINT)
        srv.wait_exit(60)
        wait_gone(pids.values(), 40)
        assert "SIGINT: stopping" in srv.output() and "ds-spd serve: stopped" in srv.output()
        assert_no_shm_left(shm_before, "a server stopped by Ctrl-C")
    finally:
        srv.kill()
    # the server's temp log (ServerProcess made it) is gone, its text kept in memory
    assert not os.path.exists(srv.log_path) and "ds-spd serve: stopped" in srv.output()


@pytest.mark.multirank
def test_port_in_use_is_refused_before_loading(chat_dir):
    import socket
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        srv = ServerProcess(["--model", chat_dir, "--port", str(port)], wait=False)
        try:
            code = srv.wait_exit(120)
        finally:
            srv.kill()
    out = srv.output()
    assert code != 0 and f"cannot listen on 127.0.0.1:{port}" in out
    assert "loading" not in out.lower().split("cannot listen")[0].split("ds-spd serve")[-1]
    assert "Loading weights" not in out and "loading shards" not in out


def test_free_port_is_below_the_kernels_ephemeral_range():
    """Master ports are drawn where the kernel never hands one out (bind to 0, outgoing connections), so no other
    process can take it between the choice and the launcher's bind (a server test failed in CI on that race)."""
    from ds_spd.core.comm import _ephemeral_low, free_port
    ports = {free_port() for _ in range(20)}
    assert all(10000 <= p < _ephemeral_low() for p in ports) and len(ports) > 1
