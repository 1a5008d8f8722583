"""Faults on servers of their own, started as users start them: a killed rank, ports in use (the master port, the
HTTP port), and which addresses count as private."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests
from helpers import ROOT
from serve_helpers import SPD, ServerProcess, post, wait_gone

@pytest.mark.multirank
def test_killed_rank_fails_pending_with_503_and_all_exit(chat_dir):
    """A prefix cache of one pool slot first (eviction through the server): a prompt evicted by another is
    prefilled again and answered the same, the other is reused. Then SIGKILL to rank 1 mid-request: 503 for the
    pending request, /health 503, every rank exits."""
    from transformers import AutoConfig

    from ds_spd.core.layout import TPLayout
    from ds_spd.serve.prefix_cache import slot_bytes
    config = AutoConfig.from_pretrained(chat_dir)
    one = slot_bytes(TPLayout.for_model(config, 2), config.num_hidden_layers, False, 512, 4)
    srv = ServerProcess(["--model", chat_dir, *SPD, "--enforce-eager", "--served-model-name", "tiny",
                         "--exit-linger", "3", "--max-model-len", "512", "--prefix-cache-gb", str(1.5 * one / 2**30)])
    try:
        assert "prefix cache on (1 finished sequences)" in srv.output()
        a, b = "def main import os and sys and then return x " * 3, "while True pass lambda x the class of " * 3

        def ask(prompt):
            body = post(srv, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 4,
                                                 "temperature": 0}).json()
            return body["choices"][0]["text"], body["usage"]["prompt_tokens_details"]["cached_tokens"], \
                body["usage"]["prompt_tokens"]
        first_a, first_b = ask(a), ask(b)          # b's sequence evicts a's from the one pool slot
        again_a, again_b = ask(a), ask(b)          # each was evicted by the other: prefilled again, same answer
        assert again_a[0] == first_a[0] and again_a[1] < again_a[2] // 2
        assert again_b[0] == first_b[0] and again_b[1] < again_b[2] // 2
        assert ask(b)[1] >= again_b[2] - 1          # the last one in the pool is reused
        pids = srv.rank_pids()
        result = {}

        def pending():
            result["r"] = post(srv, "/v1/completions", {"model": "tiny", "prompt": "def main", "max_tokens": 400,
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


def test_a_master_port_in_use_is_refused_at_once(tmp_path):
    """A --master_port that another launch holds: one line naming the flag, before any rank starts."""
    import socket
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen(1)
        port = held.getsockname()[1]
        start = time.monotonic()
        proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "tp.sh"), "2", "serve", "--model", "x"],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "DS_LAUNCH_ARGS": f"--master_port {port}",
                                   "DS_SPD_PYTHON": sys.executable})
    assert proc.returncode != 0 and time.monotonic() - start < 20
    assert f"master port {port} is in use" in proc.stderr and "--master_port" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr   # one line, no traceback


def test_port_in_use_is_refused_before_any_rank_starts_or_loads(chat_dir):
    """`launch/tp.sh 2 serve --port P` with P held: one line from the launcher, before any rank starts; a server
    started another way (one process here; rank 0 under any launcher) refuses it before loading weights."""
    import socket
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        outs = []
        for nprocs, tp in ((2, []), (0, ["--virtual-tp", "2"])):
            start = time.monotonic()
            srv = ServerProcess(["--model", chat_dir, *tp, "--port", str(port)], nprocs=nprocs, wait=False)
            try:
                code = srv.wait_exit(120)
            finally:
                srv.kill()
            outs.append((code, srv.output(), time.monotonic() - start))
    (tp_code, tp_out, tp_seconds), (one_code, one_out, _) = outs
    line = f"ds-spd serve: error: cannot listen on 127.0.0.1:{port}"
    assert tp_code == 2 and tp_out.strip().startswith(line) and len(tp_out.strip().splitlines()) == 1, tp_out
    assert tp_seconds < 20   # no rank imported torch and DeepSpeed to find this out
    assert one_code == 2 and line in one_out
    assert "loading" not in one_out.lower().split("cannot listen")[0].split("ds-spd serve")[-1]
    assert "Loading weights" not in one_out and "loading shards" not in one_out


def test_free_port_is_below_the_kernels_ephemeral_range():
    """Master ports are drawn where the kernel never hands one out (bind to 0, outgoing connections), so no other
    process can take it between the choice and the launcher's bind (a server test failed in CI on that race)."""
    from ds_spd.ports import _ephemeral_low, free_port
    ports = {free_port() for _ in range(20)}
    assert all(10000 <= p < _ephemeral_low() for p in ports) and len(ports) > 1


def test_only_loopback_addresses_count_as_private():
    """Binding any other address without an API key prints a warning (ds_spd.serve.server)."""
    from ds_spd.serve.server import _loopback
    assert all(_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "myhost"))
