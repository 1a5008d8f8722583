"""Helpers for the serving tests: a server started as users start it (ds_spd.tools.serve_process), and checks
that processes and shared-memory files are gone."""
from __future__ import annotations

import time

from ds_spd.tools.serve_process import ServerProcess  # noqa: F401  (the tests' way to start a server)

PROMPTS = ["def main", "The class of", "x", "import os and sys and then", "while True: pass", "a b c d e f g",
           "return", "lambda x"]
SPD = ["--spd-blocks", "0,2"]   # the test servers' SPD blocks (of the tiny 4-block model)
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
API_KEY = "sk-ds-spd-test-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def post(server, path: str, body, timeout: float = 120, data=None, headers=None):
    """POST to a test server with the API key (harmless where the server has none)."""
    import requests
    return requests.post(f"{server.url}{path}", json=body, data=data, timeout=timeout,
                         headers={**AUTH, **(headers or {})})


def wait_gone(pids, timeout: float) -> None:
    """Wait until none of ``pids`` runs any more (zombies count as gone)."""
    import psutil
    end = time.monotonic() + timeout

    def alive(p):
        try:
            return psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    while any(alive(p) for p in pids):
        if time.monotonic() > end:
            raise AssertionError(f"still running after {timeout} s: {[p for p in pids if alive(p)]}")
        time.sleep(0.1)


