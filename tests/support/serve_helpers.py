"""Helpers for the serving tests: a server started as users start it (ds_spd.tools.serve_process), and checks
that processes and shared-memory files are gone."""
from __future__ import annotations

import time

from ds_spd.tools.serve_process import ServerProcess  # noqa: F401  (the tests' way to start a server)


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


