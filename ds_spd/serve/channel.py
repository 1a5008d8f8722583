"""The plan channel from rank 0 to the other TP ranks, and how each side learns that the other died.

A message queue, not a collective (vLLM's workers read scheduler output from a message queue too): an
idle server sends nothing, and a rank waiting for the next plan waits in a socket read that no watchdog
times out. Rank 0 listens on an ephemeral port and tells the others where through the process group it
already has (with a random token, so a stranger cannot join); each rank connects once. Messages are
length-prefixed JSON (never pickle).

Liveness rides on the same sockets. The others never write after their hello, so a readable socket on
rank 0 means that rank is gone; rank 0's monitor thread sees it at once, even while the main thread is
stuck in an all-reduce that will never complete (DeepSpeed's shared-memory all-reduce spins forever on a dead
peer). On the other ranks a reader thread owns the socket: end of stream before the stop plan
(ds_spd.serve.step.STOP) means rank 0 is gone, and the rank exits at once, whatever its main thread is doing.
"""
from __future__ import annotations

import json
import os
import queue
import secrets
import select
import socket
import struct
import threading
from typing import Callable

_HEADER = struct.Struct("!I")


def _send(sock: socket.socket, obj) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket):
    head = _recv_exact(sock, _HEADER.size)
    if head is None:
        return None
    body = _recv_exact(sock, _HEADER.unpack(head)[0])
    return None if body is None else json.loads(body)


def _host_address() -> str:
    """This host's address as the other hosts reach it: the launcher's MASTER_ADDR (rank 0 runs there)."""
    return os.environ.get("MASTER_ADDR", "127.0.0.1")


class PlanSender:
    """Rank 0's end: one socket per other rank; :meth:`broadcast` sends a plan to all of them."""

    def __init__(self, world: int, broadcast_object, timeout: float = 600.0):
        self.world = world
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", 0))
        listener.listen(world)
        token = secrets.token_hex(16)
        broadcast_object([_host_address(), listener.getsockname()[1], token])
        listener.settimeout(timeout)
        self.peers: dict[int, socket.socket] = {}
        try:
            while len(self.peers) < world - 1:
                conn, _ = listener.accept()
                conn.settimeout(timeout)
                hello = _recv(conn)
                if not isinstance(hello, dict) or hello.get("token") != token:
                    conn.close()   # not one of ours
                    continue
                conn.settimeout(None)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.peers[int(hello["rank"])] = conn
        finally:
            listener.close()
        self._lock = threading.Lock()

    def broadcast(self, plan: dict) -> None:
        with self._lock:
            for sock in self.peers.values():
                _send(sock, plan)

    def watch(self, on_death: Callable[[int], None]) -> threading.Thread:
        """Call ``on_death(rank)`` (once) from a daemon thread when any other rank's socket closes."""
        def monitor():
            by_fd = {s.fileno(): r for r, s in self.peers.items()}
            while True:
                readable, _, _ = select.select(list(by_fd), [], [])
                if readable:
                    return on_death(by_fd[readable[0]])
        thread = threading.Thread(target=monitor, name="ds-spd-rank-monitor", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        for sock in self.peers.values():
            sock.close()


class PlanReceiver:
    """Another rank's end: a reader thread queues plans; rank 0 gone (end of stream) calls ``on_death``."""

    def __init__(self, rank: int, broadcast_object, on_death: Callable[[], None]):
        host, port, token = broadcast_object(None)
        self.sock = socket.create_connection((host, port), timeout=600)
        self.sock.settimeout(None)
        _send(self.sock, {"rank": rank, "token": token})
        self.plans: queue.SimpleQueue = queue.SimpleQueue()

        def reader():
            while True:
                try:
                    plan = _recv(self.sock)
                except OSError:
                    plan = None
                if plan is None:
                    return on_death()
                self.plans.put(plan)
                if plan.get("stop"):
                    return   # rank 0 is done with us: its going away next is no death
        threading.Thread(target=reader, name="ds-spd-plan-reader", daemon=True).start()

    def next(self) -> dict:
        return self.plans.get()
