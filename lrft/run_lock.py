"""One writer per dir: the lock a command holds on a run dir (or a dir it writes) while it writes it,
so a second `lrft train` (or `merge --out`, `analyze`, a sweep worker) on the same dir is refused in
one line instead of mixing its files into the first one's.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from lrft import console
from lrft.errors import LrftError


class Busy(LrftError):
    """Another live process holds the lock of the dir (it is training or writing it)."""


@contextmanager
def writer_lock(directory: Path):
    """Hold the lock of `directory` (a run dir, or a dir a command writes) while the block runs.

    The lock is a `filelock.FileLock` beside the dir (`.<name>.lock`: the dir itself may be deleted and
    made anew while it is held), with the holder's host, pid and start time beside it. A live holder
    makes this refuse with one line; a holder that is gone (killed before it could let go) is taken
    over with a warning.
    """
    from filelock import FileLock, Timeout

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(directory.parent / f".{directory.name}.lock")
    info_path = directory.parent / f".{directory.name}.lock.json"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = _holder(info_path)
        if not _gone(holder):
            raise Busy(
                f"{directory}: {_describe(holder)} is writing it; wait until it is done (or stop it), "
                f"or write elsewhere"
            ) from None
        Path(lock.lock_file).unlink(missing_ok=True)  # a lock only a file says is held (a soft lock)
        lock.acquire(timeout=0)
    previous = _holder(info_path)
    if previous and previous.get("pid") != os.getpid():
        console.warn(f"{directory}: taking over from {_describe(previous)}, which is gone without letting go")
    info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    info_path.write_text(json.dumps(info), encoding="utf-8")
    try:
        yield
    finally:
        info_path.unlink(missing_ok=True)
        # Removed while still held, so no lock file outlives the command (a refused command leaves no new
        # file): whoever opens the name afterwards gets a fresh file, and this writer is done by now.
        Path(lock.lock_file).unlink(missing_ok=True)
        lock.release()


def _holder(info_path: Path) -> dict:
    try:
        return json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    return f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"


def _gone(holder: dict) -> bool:
    """Whether the holder is known dead: only a process of this host can be checked."""
    if not holder or holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, KeyError):
        return False
    return False
