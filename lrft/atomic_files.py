"""Files on disk, written so that a killed process never leaves one that looks complete.

Every file and dir is written under a temporary name (`.NAME.tmp-PID`), fsynced and renamed; what a
killed writer left behind is removed by the next write to the same place. A dir is replaced only
after lrft.guard's check. JSON Lines are appended whole lines at a time, and read back up to the
first line a kill cut short. `check_writable` refuses, before any work, an output lrft could not write.

A disk that fails under a write (full, over quota, read-only, an I/O error: lrft.errors.DISK_ERRORS) is
a DiskError naming the dir and what was being written, after the write's temporary file or dir is
removed: what was on disk before is all there is, so the same command, rerun, does the work.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lrft import console
from lrft.errors import DISK_ERRORS, DiskError, LrftError
from lrft.guard import check_replaceable

# Bytes an atomic write adds to a name (`.NAME.tmp-PID`): a name must leave room for them.
TEMP_NAME_EXTRA = 24


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_stale(directory: Path, prefix: str = ".") -> None:
    """Remove the `.NAME.tmp-PID` / `.NAME.old-PID` files and dirs that killed writers left in `directory`."""
    if not directory.is_dir():
        return
    for p in directory.glob(f"{prefix}*"):
        _, sep, pid = p.name.rpartition(".tmp-") if ".tmp-" in p.name else p.name.rpartition(".old-")
        if sep and pid.isdigit() and not _alive(int(pid)):
            _remove(p)


def _remove(path: Path) -> None:
    """Remove a temporary file or dir of ours (a link is removed, never followed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# ---------------------------------------------------------------------------------- disk failures

# SQLite's words for a disk that failed under it (it gives no errno)
SQLITE_DISK = {"database or disk is full": errno.ENOSPC, "disk i/o error": errno.EIO}


def disk_errno(error: BaseException) -> int | None:
    """The errno of a disk failure (lrft.errors.DISK_ERRORS) behind `error` or the errors it came from, else
    None: an OSError, safetensors' error (which only says `os error 28`), SQLite's (through SQLAlchemy)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, LrftError):  # already said in one line (a DiskError says its errno)
            return error.code if isinstance(error, DiskError) else None
        if isinstance(error, OSError) and error.errno in DISK_ERRORS:
            return error.errno
        if type(error).__name__ == "SafetensorError" and (found := re.search(r"os error (\d+)", str(error))):
            return int(found.group(1)) if int(found.group(1)) in DISK_ERRORS else None
        if isinstance(error, sqlite3.OperationalError):
            return next((code for words, code in SQLITE_DISK.items() if words in str(error).lower()), None)
        error = getattr(error, "orig", None) or error.__cause__  # SQLAlchemy keeps SQLite's error in .orig
    return None


@contextmanager
def disk_failures(where: Path, what: str, inner: Path | None = None) -> Iterator[None]:
    """A disk failure under the block → DiskError naming the dir `where` and `what` was being written; a
    DiskError of a write in `inner` (the temporary dir of an atomic dir) is named by this one instead."""
    try:
        yield
    except DiskError as e:
        if inner is None or not e.where.is_relative_to(inner):
            raise
        raise DiskError(e.code, where, what) from e
    except Exception as e:
        code = disk_errno(e)
        if code is None:
            raise
        raise DiskError(code, where, what) from e


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read a MiB at a time (weights files are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ atomic writes


def atomic_write_bytes(path: Path, data: bytes, what: str | None = None) -> None:
    """`path` holds `data` whole, or (the process killed, the disk failed) what it held before;
    `what`: what the file is, for a disk failure's message (default: its name)."""
    path = Path(path)
    with disk_failures(path.parent, what or path.name):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path.parent, f".{path.name}.")
        tmp = _tmp_name(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # nothing left of a failed write
        _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str, what: str | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), what)


def atomic_write_json(path: Path, obj: Any, what: str | None = None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n", what)


@contextmanager
def atomic_dir(
    final: Path, overwrite: bool = True, *, flag: str | None = None, what: str | None = None
) -> Iterator[Path]:
    """Yield a temporary dir; on success it replaces `final` in one rename, on failure it vanishes.
    An existing `final` is replaced only if lrft.guard allows it (`flag`: the option that named it).
    `what`: what the dir is, for a disk failure's message (default: its name)."""
    final = Path(final)
    with disk_failures(final.parent, what or f"{final.name}/", inner=_tmp_name(final)):
        with _atomic_dir(final, overwrite, flag) as tmp:
            yield tmp


@contextmanager
def _atomic_dir(final: Path, overwrite: bool, flag: str | None) -> Iterator[Path]:
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final.parent, f".{final.name}.")
    tmp = _tmp_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        mode = plain_file_mode(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, mode)  # safetensors writes its files 0600; give them what every other file gets
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            if not overwrite:
                raise LrftError(f"{final} already exists; pass --force to replace it")
            check_replaceable(final, flag)
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable(path: Path, flag: str, kind: str = "dir") -> None:
    """Refuse, before any work, an output `path` (a "dir" or a "file", named by `flag`) that lrft could not
    write: a file where a dir goes or the reverse, a path under a file, a name too long, no permission."""
    path = Path(path)
    if "\0" in str(path):
        raise LrftError(f"{flag}: {str(path)!r} holds a NUL character, which no path can hold; give another path")
    existing = path
    try:
        while not _exists(existing) and existing != existing.parent:
            existing = existing.parent
    except OSError as e:
        raise LrftError(
            f"{flag}: cannot reach {existing} ({e.strerror}); give a path in a dir you can write to"
        ) from None
    if existing == path and path.is_dir() != (kind == "dir"):
        raise LrftError(
            f"{flag}: {path} is a {'file' if kind == 'dir' else 'dir'}, not a {kind}; give a path for a {kind}"
        )
    if existing != path and not existing.is_dir():
        raise LrftError(f"{flag}: {existing} is a file, so {path} cannot be created under it; give a path under a dir")
    limit = _name_max(existing)
    for part in path.parts[len(existing.parts) :]:
        if len(part.encode()) + TEMP_NAME_EXTRA > limit:
            raise LrftError(
                f"{flag}: the name {part[:24]}… is {len(part.encode())} bytes long; names in "
                f"{existing} may have {limit - TEMP_NAME_EXTRA} bytes at most, so use a shorter one"
            )
    probe_in = existing if existing.is_dir() else existing.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lrft-probe-", dir=probe_in))
    except OSError as e:
        raise LrftError(
            f"{flag}: cannot write in {probe_in} ({e.strerror}); give a path in a dir you can write to"
        ) from None


def _exists(path: Path) -> bool:
    """Whether `path` exists; a name too long for the file system does not."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            return False
        raise
    return True


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def plain_file_mode(directory: Path) -> int:
    """The permission bits a file created with open() gets in `directory` (0644 under umask 022)."""
    probe = Path(directory) / f".mode-probe-{os.getpid()}"
    probe.touch()
    try:
        return probe.stat().st_mode & 0o777
    finally:
        probe.unlink()


def append_jsonl(path: Path, record: dict) -> None:
    """Append one line (whole lines only: a reader never sees half a record from a finished write; a
    line the disk failed under is cut off again)."""
    path = Path(path)
    with disk_failures(path.parent, path.name):
        size = path.stat().st_size if path.exists() else 0
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except BaseException:
            if path.exists() and path.stat().st_size > size:
                os.truncate(path, size)  # giving back space never needs any
            raise


def write_jsonl(path: Path, records: list[dict]) -> None:
    """A whole JSON Lines file, written atomically (non-ASCII kept as is)."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON Lines file lrft wrote, up to the first line that is not a whole JSON object:
    a line a kill cut short (nothing after it was written), or damage (warned about: lines are lost)."""
    if not Path(path).is_file():
        return []
    lines = Path(path).read_bytes().decode("utf-8", errors="replace").splitlines()
    out = []
    for n, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            if n < len(lines):
                console.warn(
                    f"{path}: line {n} is not a JSON object; the file is damaged, so lines {n}-{len(lines)} "
                    f"are left out"
                )
            break
        out.append(record)
    return out


def read_json(path: Path, what: str) -> dict:
    """A JSON object file (`what` says which); one clear error for a file missing, damaged or of another shape."""
    path = Path(path)
    if not path.is_file():
        raise LrftError(f"{path}: missing {what}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LrftError(
            f"{path}: not valid JSON ({e}); restore the {what}, or rerun the command that wrote it"
        ) from None
    if not isinstance(obj, dict):
        raise LrftError(
            f"{path}: the {what} is a JSON {type(obj).__name__}, not an object; restore it, or rerun the "
            f"command that wrote it"
        )
    return obj
