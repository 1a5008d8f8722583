"""Where ds_spd writes: checked before the work, written atomically, never over what ds_spd did not write.

Every command checks its output paths before it loads a model (:func:`check_output_file`,
:func:`check_output_dir`): the place must be writable (probed by creating a file, which also works as
root), and an existing file there must be one ds_spd wrote (:func:`owned`), else the command refuses.
Files are written to ``PATH.tmp<pid>`` and renamed into place (:func:`write_atomic`); directories (the
SPD checkpoint) are built beside their target and swapped in with one atomic ``renameat2(RENAME_EXCHANGE)``
(:func:`publish_dir`), so at every instant the path holds either the old or the new complete directory.
Leftovers of killed processes (``.tmp<pid>`` / ``.old<pid>`` of a dead pid) are cleaned up, and an
old directory moved aside by the fallback path is moved back (:func:`clean_stale`).
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import tempfile
from typing import Callable, Iterable

from ds_spd.errors import OutputError

#: PNG text key and Markdown first line that mark a file as written by ds_spd.
PNG_KEY, PNG_VALUE = "Software", "ds_spd"
MD_MARK = "<!-- written by ds_spd -->"


def owned(path: str) -> bool:
    """Whether the existing file ``path`` was written by ds_spd (by its format marker)."""
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".json":
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            return isinstance(data, dict) and str(data.get("format", "")).startswith("ds_spd.")
        if ext == ".png":
            from PIL import Image
            with Image.open(path) as img:
                return getattr(img, "text", {}).get(PNG_KEY, "").startswith(PNG_VALUE)
        if ext == ".md":
            with open(path, encoding="utf-8") as f:
                return f.readline().strip() == MD_MARK
    except (OSError, ValueError, SyntaxError):  # unreadable, not JSON / not an image: not ours
        return False
    return False


def _nearest_existing(path: str) -> str:
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(d):
        d = os.path.dirname(d)
    return d


def check_writable_place(path: str, what: str, shown: str | None = None) -> None:
    """``path``'s directory exists or can be created, and a file can be created there (probed); errors name
    ``shown`` (default ``path``)."""
    base = _nearest_existing(path)
    path = shown or path
    if not os.path.isdir(base):
        raise OutputError(f"{what} {path!r}: {base!r} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".ds_spd_probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"{what} {path!r}: cannot write into {base!r} ({err.strerror})") from None


def check_output_file(path: str, what: str) -> str:
    """Before the work: ``path`` can be written and holds nothing ds_spd did not write."""
    if os.path.isdir(path):
        raise OutputError(f"{what} {path!r} is a directory; give a file path")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise OutputError(f"{what} {path!r} exists and is not a regular file")
    if os.path.isfile(path) and not owned(path):
        raise OutputError(f"{what} {path!r} exists and was not written by ds_spd: refusing to overwrite it "
                          "(choose another path, or move the file away)")
    check_writable_place(path, what)
    return path


def check_output_dir(path: str, what: str, names: Iterable[str] = (),
                     is_ours: Callable[[str], bool] | None = None) -> str:
    """Before the work: ``path`` is a new, empty or ds_spd-written directory.

    ``names``: files written into an existing directory (each must be new or :func:`owned`);
    ``is_ours``: a test of the whole directory (e.g. "is an SPD checkpoint"), for directories replaced whole.
    """
    if os.path.isfile(path):
        raise OutputError(f"{what} {path!r} is a file; give a directory path")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutputError(f"{what} {path!r} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path):
        if is_ours is not None and not is_ours(path):
            raise OutputError(f"{what} {path!r} exists, is not empty and was not written by ds_spd: refusing to "
                              "replace it (choose another path, or move it away)")
        for name in names:
            check_output_file(os.path.join(path, name), what)
    check_writable_place(os.path.join(path, "x"), what, shown=path)
    return path


def write_atomic(path: str, write: Callable[[str], None] | str | bytes) -> str:
    """Write ``path`` through ``PATH.tmp<pid>`` + rename; ``write`` is the content or ``write(tmp_path)``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        if callable(write):
            write(tmp)
        else:
            with open(tmp, "wb" if isinstance(write, bytes) else "w", **({} if isinstance(write, bytes)
                                                                          else {"encoding": "utf-8"})) as f:
                f.write(write)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return path


def write_json(path: str, data: dict, fmt: str) -> str:
    """Atomic JSON with a ``"format": "ds_spd.<fmt>"`` marker (what :func:`owned` recognises)."""
    return write_atomic(path, json.dumps({"format": f"ds_spd.{fmt}", **data}, indent=2, default=str))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def publish_dir(tmp: str, path: str) -> str:
    """Move the complete directory ``tmp`` to ``path``; an existing ``path`` is replaced atomically."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return path
    if _exchange(tmp, path):     # path: new; tmp: old
        shutil.rmtree(tmp)
        return path
    old = f"{path.rstrip(os.sep)}.old{os.getpid()}"   # fallback: old aside, new in, old deleted
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(path: str, allowed: Iterable[str]) -> list[str]:
    """Remove ``PATH.tmp<pid>`` / ``PATH.old<pid>`` directories of dead processes (or of this one, which calls
    this before it writes) whose files are all in
    ``allowed`` (so nothing else is ever deleted); restore an ``.old`` directory if ``path`` is missing."""
    path = path.rstrip(os.sep)
    parent, base = os.path.split(os.path.abspath(path))
    if not os.path.isdir(parent):
        return []
    allowed, removed = set(allowed), []
    pattern = re.compile(re.escape(base) + r"\.(tmp|old)(\d+)$")
    for name in sorted(os.listdir(parent)):
        m = pattern.match(name)
        full = os.path.join(parent, name)
        pid = int(m.group(2)) if m else 0
        if not m or not os.path.isdir(full) or (pid != os.getpid() and _alive(pid)):
            continue  # this process is about to write: its own leftovers are stale too
        if not set(os.listdir(full)) <= allowed:
            continue
        if m.group(1) == "old" and not os.path.lexists(path):
            os.rename(full, path)   # killed between "old aside" and "new in": the old one is still whole
            continue
        shutil.rmtree(full)
        removed.append(full)
    return removed
