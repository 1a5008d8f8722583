"""``launch/tp.sh``: the deepspeed launcher on N ranks of this host, run the way a process supervisor expects.

``python -m ds_spd.launch N COMMAND [ARGS...]`` runs ``deepspeed --num_gpus N [$DS_LAUNCH_ARGS] --module ds_spd
COMMAND ARGS`` and stays in front of it. DeepSpeed's runner alone is not supervisor-friendly: SIGTERM kills the
runner and leaves the ranks running (it passes no signal on within one node), its launcher answers Ctrl-C with a
SIGTERM to every rank and exits 1 whatever they did, and every launch on a host takes master port 29500.

- **Ports.** Without ``--master_port`` in ``$DS_LAUNCH_ARGS`` a free one is drawn (ds_spd.ports), so several
  launches share a host; a given port that is already bound here is refused at once, naming the flag. For
  ``serve``, a ``--port`` that cannot be bound on ``--host`` is refused too, before any rank starts.
- **Signals.** The runner runs in its own session, so a terminal's Ctrl-C reaches only this process. SIGTERM or
  SIGINT here sends one SIGTERM to every rank: a server drains and stops, any other command stops. A second
  signal sends a second SIGTERM (a server cancels what is left); a third kills the whole launch. If this
  process is killed outright, the runner gets SIGTERM from the kernel, and a server's rank 0 sees its runner go.
- **Status.** This process exits with the launch's status: 0 after a clean stop, the ranks' status after a
  failure, 128 + N if the launch was killed by signal N.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

from ds_spd.errors import SPDInputError
from ds_spd.ports import bind_http, free_port, port_in_use

USAGE = "usage: launch/tp.sh N COMMAND [ARGS...]  (extra launcher flags in $DS_LAUNCH_ARGS)"
_LOCAL = ("", "localhost", "127.0.0.1", "::1")


def _flag(args: list[str], name: str) -> str | None:
    """The value of ``--name V`` or ``--name=V`` in a launcher argument list (the last one wins, as argparse)."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def runner_command(n: int, args: list[str], launch_args: list[str]) -> list[str]:
    """The deepspeed runner's command line, with a master port that no other launch on this host holds."""
    given = _flag(launch_args, "--master_port")
    if given is None:
        port_args = ["--master_port", str(free_port())]
    else:
        local = _flag(launch_args, "--hostfile") is None and _flag(launch_args, "--master_addr") in (None, *_LOCAL)
        if local and given.isdigit() and port_in_use(int(given)):
            raise SystemExit(f"launch/tp.sh: master port {given} is in use on this host (another launch?): choose "
                             "another with --master_port in DS_LAUNCH_ARGS, or leave it out to get a free one")
        port_args = []
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n), *port_args, *launch_args,
            "--module", "ds_spd", *args]


def check_http_port(args: list[str]) -> None:
    """``serve``: the HTTP port rank 0 will listen on, tried here before any rank starts (a second instead of
    every rank's imports; rank 0 tries again when started by another launcher)."""
    if args[:1] != ["serve"]:
        return
    from ds_spd.cli import build_parser
    flags, _ = build_parser().parse_known_args(args)
    if flags.port:
        bind_http(flags.host, flags.port).close()


def rank_processes(root_pid: int) -> list:
    """The rank processes below ``root_pid``: those the launcher gave a LOCAL_RANK (not their own children)."""
    import psutil
    ranks = []
    try:
        below = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return []
    pids = set()
    for p in below:
        try:
            if "LOCAL_RANK" in p.environ() and p.ppid() not in pids:
                ranks.append(p)
                pids.add(p.pid)
        except psutil.Error:
            continue
    return ranks


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM from the kernel when this supervisor dies (Linux prctl)."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def supervise(cmd: list[str]) -> int:
    """Run ``cmd`` in its own session, pass SIGTERM/SIGINT on to its ranks, return its exit status."""
    received: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _f: received.append(signum))
    signal.signal(signal.SIGINT, lambda signum, _f: received.append(signum))
    child = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent)
    handled = 0
    while child.poll() is None:
        if handled < len(received):
            handled = len(received)
            name = signal.Signals(received[-1]).name
            if handled >= 3:
                print(f"launch/tp.sh: {name} again: killing the launch", file=sys.stderr, flush=True)
                os.killpg(child.pid, signal.SIGKILL)
            else:
                ranks = rank_processes(child.pid)
                print(f"launch/tp.sh: {name}: SIGTERM to {len(ranks)} rank(s)"
                      + (" (signal once more to kill the launch)" if handled == 2 else ""), file=sys.stderr, flush=True)
                if not ranks:   # not started yet: stop the launcher itself
                    os.killpg(child.pid, signal.SIGTERM)
                for p in ranks:
                    try:
                        p.send_signal(signal.SIGTERM)
                    except Exception:   # noqa: BLE001  (gone meanwhile)
                        pass
        time.sleep(0.1)
    code = child.returncode
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or not argv[0].isdigit() or int(argv[0]) < 1:
        print(USAGE, file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        check_http_port(argv[1:])
    except SPDInputError as err:
        print(f"ds-spd {argv[1]}: error: {err}", file=sys.stderr)
        return 2
    cmd = runner_command(int(argv[0]), argv[1:], shlex.split(os.environ.get("DS_LAUNCH_ARGS", "")))
    return supervise(cmd)


if __name__ == "__main__":
    sys.exit(main())
