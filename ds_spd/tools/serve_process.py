"""Start ``ds-spd serve`` as a user does, in subprocesses, and wait for it: for the serving benchmark and the tests.

Three ways, as the project launches every command: ``launch/tp.sh`` on this host (``hosts=1``: the deepspeed
launcher behind ds_spd.launch, which picks the master port), one process (``nprocs=0``: virtual TP or tp 1), or
``hosts`` simulated hosts of one rank each: each a torchrun node
in its own mount namespace with a private /dev/shm (as the multi-node tests run), so DeepSpeed's shared-memory
all-reduce cannot see the other host's ranks and every all-reduce crosses "hosts" over gloo.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from ds_spd.ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE")


def namespaces_work() -> bool:
    """Whether this machine can simulate hosts: ``unshare -m`` and a private tmpfs on /dev/shm (root)."""
    import shutil
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /dev/shm"], capture_output=True)
    return probe.returncode == 0


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    return {**env, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


class ServerProcess:
    """A running ``ds-spd serve ARGS`` on ``nprocs`` ranks; ``url`` once :meth:`wait_ready` returned."""

    def __init__(self, args: list[str], nprocs: int = 2, hosts: int = 1, log_path: str | None = None,
                 wait: bool = True, timeout: float = 600, env: dict | None = None, root: str = ROOT):
        # --port 0: the server binds a free port itself and prints it (no window for another process to take it);
        # a --port in args comes later and wins
        self.port: int | None = None
        self.url: str | None = None
        serve = ["serve", "--port", "0", *args]
        self.own_log = log_path is None   # a temp file of ours: read back and removed when the server is killed
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="ds_spd_serve_", suffix=".log")
            os.close(fd)
        self.log_path, self._final_output = log_path, None
        self.log = open(log_path, "w")
        popen = dict(stdout=self.log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True,
                     env={**_env(), **(env or {})})   # root: another checkout's code (benchmarks of two commits)
        if hosts > 1:
            master = str(free_port())
            self.procs = []
            for node in range(hosts):
                torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(hosts), "--node_rank",
                            str(node), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", master,
                            "-m", "ds_spd", *serve]
                inner = "mount -t tmpfs tmpfs /dev/shm && exec " + " ".join(f"'{a}'" for a in torchrun)
                self.procs.append(subprocess.Popen(["unshare", "-m", "sh", "-c", inner], **popen))
        elif nprocs:
            popen["env"] = {**popen["env"], "DS_SPD_PYTHON": sys.executable}
            self.procs = [subprocess.Popen(["bash", os.path.join(root, "launch", "tp.sh"), str(nprocs), *serve],
                                           **popen)]
        else:
            self.procs = [subprocess.Popen([sys.executable, "-m", "ds_spd", *serve], **popen)]
        self.proc = self.procs[0]
        if wait:
            self.wait_ready(timeout)

    def output(self) -> str:
        if self._final_output is not None:
            return self._final_output
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def _find_url(self) -> bool:
        """Read the port the server printed ("listening on http://HOST:PORT") into ``port`` and ``url``."""
        if self.url is None:
            m = re.search(r"ds-spd serve: listening on http://[^\s]*?:(\d+)", self.output())
            if m:
                self.port = int(m.group(1))
                self.url = f"http://127.0.0.1:{self.port}"
        return self.url is not None

    def healthy(self) -> bool:
        if not self._find_url():
            return False
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(p.poll() is not None for p in self.procs):
                self.kill()
                raise RuntimeError(f"server exited before it was ready:\n{self.output()[-6000:]}")
            if self.healthy():
                return
            time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.output()[-6000:]}")

    def rank_pids(self) -> dict[int, int]:
        """{rank: pid} of the rank processes (under the deepspeed launcher)."""
        import psutil
        out = {}
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            for a in p.cmdline():
                if a.startswith("--local_rank="):
                    out[int(a.split("=")[1])] = p.pid
        return out

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"server still running after {timeout} s:\n{self.output()[-6000:]}") from None

    def signal(self, signum: int) -> None:
        """A signal to the process the user started (as a supervisor sends it): not to the group."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signum)

    def interrupt(self, timeout: float = 60) -> None:
        """Ctrl-C, as in a terminal: SIGINT to the foreground process group; SIGKILL what is left after ``timeout``."""
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
        end = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(end - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL to every process of the server: the launch supervisor's runner has a session of its own."""
        import psutil
        for p in self.procs:
            try:
                below = psutil.Process(p.pid).children(recursive=True) if p.poll() is None else []
            except psutil.Error:
                below = []
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            for q in below:
                try:
                    q.kill()
                except psutil.Error:
                    pass
            p.wait()
        self.log.close()
        if self.own_log and self._final_output is None:
            self._final_output = self.output()
            os.unlink(self.log_path)
