"""`serve`'s default compiled decode step on 2 real TP ranks (a file of its own, so another test worker runs it beside
the fault tests): plain SPD blocks and a checkpoint with lagged attention, each against `ds-spd generate`."""
from __future__ import annotations

import pytest
from serve_helpers import SPD, ServerProcess, post


@pytest.mark.multirank
@pytest.mark.parametrize("lag", [False, True])
def test_compiled_decode_on_real_ranks_equals_generate(chat_dir, capsys, tmp_path, lag):
    """`serve` with its default compiled decode steps on 2 real TP ranks (the shared-memory all-reduce traced
    inside the graph): two greedy requests sent at once (steps of one row and of two), then one that reuses the
    first's prompt from the prefix cache, each give `ds-spd generate`'s text. ``lag``: a checkpoint with lagged
    attention (its state per slot and position in the serving cache, moved with a reused prefix)."""
    from concurrent.futures import ThreadPoolExecutor

    from helpers import cli_json, spd_checkpoint
    first = "def main import os and sys and then " * 3   # a prefix past the lagged state's 16-position granule
    prompts = [first, "the quick brown", first + "x y"]
    blocks = ["--checkpoint", spd_checkpoint(chat_dir, str(tmp_path / "ck"), [0, 2], lag=True)] if lag else SPD
    model = ["--model", chat_dir, *blocks]
    gen = cli_json(["generate", "--virtual-tp", "2", *model, "--prompt", *prompts, "--max-new-tokens", "10"], capsys)
    srv = ServerProcess([*model, "--served-model-name", "tiny"])

    def ask(prompt):
        return post(srv, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 10,
                                             "temperature": 0}).json()
    try:
        assert "compiled decode" in srv.output()
        with ThreadPoolExecutor(2) as pool:
            bodies = list(pool.map(ask, prompts[:2]))
        bodies.append(ask(prompts[2]))
        assert [b["choices"][0]["text"] for b in bodies] == [g["completion"] for g in gen["generations"]]
        assert bodies[2]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    finally:
        srv.kill()
