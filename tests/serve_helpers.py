"""Start ``ds-spd serve`` as users do (deepspeed launcher, real ranks) and talk to it over real HTTP."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import requests
from helpers import ROOT, clean_env, free_port


class ServerProcess:
    """``deepspeed --num_gpus N --module ds_spd serve ARGS`` in its own session (so Ctrl-C can reach its group)."""

    def __init__(self, args: list[str], nprocs: int = 2, log_path: str | None = None, wait: bool = True,
                 timeout: float = 300):
        self.port = free_port()
        launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
        cmd = [launcher, "--num_gpus", str(nprocs), "--master_port", str(free_port()), "--module", "ds_spd", "serve",
               "--port", str(self.port), *args] if nprocs else \
            [sys.executable, "-m", "ds_spd", "serve", "--port", str(self.port), *args]
        if log_path is None:
            import tempfile
            fd, log_path = tempfile.mkstemp(prefix="ds_spd_serve_", suffix=".log")
            os.close(fd)
        self.log_path = log_path
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                     env=clean_env(OMP_NUM_THREADS="1"))
        self.url = f"http://127.0.0.1:{self.port}"
        if wait:
            self.wait_ready(timeout)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited ({self.proc.returncode}) before ready:\n{self.output()[-6000:]}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"server not ready after {timeout} s:\n{self.output()[-6000:]}")

    def rank_pids(self) -> dict[int, int]:
        """{rank: pid} of the rank processes (children of the launcher)."""
        import psutil
        out = {}
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            cmd = p.cmdline()
            for a in cmd:
                if a.startswith("--local_rank="):
                    out[int(a.split("=")[1])] = p.pid
        return out

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"server still running after {timeout} s:\n{self.output()[-6000:]}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


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


def shm_files() -> set[str]:
    return {f for f in os.listdir("/dev/shm") if f.startswith("deepspeed_allreduce_buffer")}
