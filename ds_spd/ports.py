"""Ports for the processes ds_spd starts (launcher master ports, a server's HTTP port), without importing torch:
the launch supervisor (``ds_spd.launch``) picks and checks them before any rank starts."""
from __future__ import annotations

import secrets
import socket

from ds_spd.errors import SPDInputError


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free port for a process we start (a launcher's master port), drawn below the kernel's ephemeral range.

    A port the kernel hands out (bind to 0) is free only until we close it: before the launcher binds it, any
    outgoing connection or ``bind(0)`` on the machine (gloo's sockets, another server's plan channel) may get
    the same number from the kernel. Below the ephemeral range only another explicit choice can collide.
    """
    low = _ephemeral_low()
    for _ in range(200):
        port = 10000 + secrets.randbelow(max(low - 10000, 1))
        if not port_in_use(port):
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "") -> bool:
    """Whether ``port`` cannot be bound on ``host`` (all interfaces by default), as the launcher's store binds it:
    with SO_REUSEADDR, as torch's TCPStore does, so a listener is found but the TIME_WAIT connections a finished
    launch leaves on the port for a minute are not (without it, a command run right after another on the default
    port was refused, and DeepSpeed's launcher then waited 30 s before ending the other rank)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def bind_http(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything heavy: a port in use is a clear error, not a late crash."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise SPDInputError(f"cannot listen on {host}:{port}: {err.strerror}: choose another --port "
                            "(or stop what holds it)") from None
    sock.listen(2048)
    return sock
