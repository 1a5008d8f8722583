"""Exclusive locks on what ds_spd writes, so that two runs never share an output or a work dir.

A lock is an OS lock (``flock``) on ``PATH.lock`` beside the output, holding one line that names its holder (pid,
host, command, start time). The kernel releases it when the holder exits or dies, so a lock of a dead process
is never stale: its file is simply taken over. The holder removes the file when it is done; a taker checks
that the file it locked is still the one at the path (else it was removed meanwhile, and it tries again), so
removing it is safe. A second writer gets one line that names the holder, before it reads any weights.
"""
from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from contextlib import contextmanager

from ds_spd.errors import OutputError

_held: dict[str, tuple[int, list[str]]] = {}   # lock file -> (descriptor, directories created for it)


def lock_path(path: str) -> str:
    return path.rstrip(os.sep) + ".lock"


def _holder_line() -> str:
    cmd = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
    return f"pid {os.getpid()} on {socket.gethostname()}, `{cmd}`, since {time.strftime('%Y-%m-%d %H:%M:%S')}"


def _take(lock: str, wait: bool) -> int | None:
    """The locked descriptor of ``lock``, or None if another process holds it (``wait=False``)."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)   # the holder removed the file between our open and our lock: take the new one


def hold(path: str, what: str) -> None:
    """Lock ``path`` (an output file or directory) for writing until :func:`release` or process exit; a path
    another process holds is an :class:`OutputError` naming the holder."""
    lock = lock_path(os.path.abspath(path))
    if lock in _held:
        return
    created, parent = [], os.path.dirname(lock)
    while not os.path.isdir(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    for d in reversed(created):
        os.mkdir(d)
    fd = _take(lock, wait=False)
    if fd is None:
        _remove_empty(created)
        try:
            with open(lock) as f:
                holder = f.read().strip() or "a process that has not yet named itself"
        except OSError:
            holder = "another process"
        raise OutputError(f"{what} {path!r} is being written by another run ({holder}): wait for it to finish, "
                          f"or choose another path")
    os.ftruncate(fd, 0)
    os.write(fd, (_holder_line() + "\n").encode())
    _held[lock] = (fd, created)


def _remove_empty(dirs: list[str]) -> None:
    """Remove the directories a lock created, innermost first, where the run left nothing in them."""
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError:
            return


def release(path: str | None = None) -> None:
    """Release the lock of ``path`` (or every lock this process holds) and remove its file."""
    for lock in [lock_path(os.path.abspath(path))] if path else list(_held):
        fd, created = _held.pop(lock, (None, []))
        if fd is None:
            continue
        try:
            os.unlink(lock)   # while still locked: a taker that opened the old file will notice and retry
        except FileNotFoundError:
            pass
        os.close(fd)
        _remove_empty(created)


@contextmanager
def waiting_lock(path: str):
    """Wait for ``PATH.lock`` (one-time work any process may do, e.g. converting the default model)."""
    lock = lock_path(path)
    os.makedirs(os.path.dirname(lock) or ".", exist_ok=True)
    fd = _take(lock, wait=True)
    try:
        yield
    finally:
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass
        os.close(fd)
