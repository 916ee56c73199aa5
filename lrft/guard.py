"""What lrft never deletes or replaces: the checks every deletion or replacement of a dir goes through.

Commands replace dirs whole (`merge --out --force`, `merge --format peft`, `analyze --out`, each atomic
dir write) and `train --restart` deletes one. Whatever the flags, lrft refuses to delete or replace a
dir, or to put a command's output, where that would destroy what it must keep:

- the root dir, the home dir, the current dir or a dir holding it;
- what the command reads (its run dir, PEFT adapter dir, base model dir), a path inside it or a dir
  holding it;
- an lrft run dir (a dir holding recipe.yaml), a path inside one or a dir holding one;

save for the command's own place inside what it reads (`analyze`'s RUN_DIR/analysis, or
RUN_DIR/comparisons/OTHER with --against; `eval`'s RUN_DIR/predictions.jsonl). `train --restart`
deletes the run's own dir, and only when every entry in it is a file or dir of the run
(`check_restartable`): files of yours put there are never taken along.
Paths are compared after resolving symlinks, so a link cannot smuggle a protected dir past a check.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from lrft.errors import LrftError
from lrft.run_layout import RECIPE


def check_output(path: Path, flag: str, *, sources: Mapping[Path, str] | None = None, own: Sequence[Path] = ()) -> None:
    """Refuse a user-chosen output path (`flag` names it) that would replace or land inside what must be
    kept; checked before any work, whether or not the path exists yet. `sources`: what the command
    reads, each with what it is ("the run dir this command reads"); `own`: the command's own places
    inside them."""
    path = Path(path)
    reason = _never_replaced(path) or _source_reason(path, sources or {}, own) or _run_reason(path, own, inside=True)
    if reason:
        raise LrftError(
            f"{flag}: {path} {reason}; lrft never writes an output there, whatever the flags; "
            f"give {flag} a new path elsewhere"
        )


def check_replaceable(path: Path, flag: str | None = None) -> None:
    """Refuse to replace the existing dir `path` whole if it is a dir lrft never replaces, a run dir or a
    dir holding one; `atomic_dir` runs this before every replacement (what a command reads was checked
    by `check_output` before it began)."""
    path = Path(path)
    reason = _never_replaced(path) or _run_reason(path, (), inside=False)
    if reason:
        where = f"{flag}: {path}" if flag else str(path)
        raise LrftError(
            f"{where} {reason}; lrft never replaces it, whatever the flags"
            + (f"; give {flag} a new path" if flag else "")
        )


def check_restartable(run_dir: Path, layout: Collection[str]) -> None:
    """`--restart` deletes `run_dir` whole: only a dir lrft may delete, holding nothing but the entries
    of a run dir's `layout` (and temporaries a killed writer left), with no other run inside."""
    run_dir = Path(run_dir)
    reason = _never_replaced(run_dir)
    if reason:
        raise LrftError(
            f"--restart: the run dir {run_dir} {reason}; lrft never deletes it; set output.dir and "
            f"name so that the run has a dir of its own"
        )
    if not run_dir.is_dir():
        return
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in layout and not is_temporary(p.name))
    if foreign:
        listed = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise LrftError(
            f"--restart: {run_dir} holds {listed} besides the run's own files; --restart deletes the "
            f"whole run dir, so move those out first (or set name=... to start a new run)"
        )
    nested = _run_below(run_dir)
    if nested is not None:
        raise LrftError(
            f"--restart: {run_dir} holds another lrft run dir, {nested}; --restart deletes the whole "
            f"run dir, so move that run out first (or set name=... to start a new run)"
        )


def remove_run_dir(run_dir: Path, layout: Collection[str]) -> None:
    """Delete a run dir for `--restart`, after `check_restartable` (again: nothing may have moved in)."""
    check_restartable(run_dir, layout)
    if Path(run_dir).is_dir():
        shutil.rmtree(run_dir)


def is_temporary(name: str) -> bool:
    """A `.NAME.tmp-PID` / `.NAME.old-PID` entry of lrft.atomic_files' atomic writes."""
    for infix in (".tmp-", ".old-"):
        head, sep, pid = name.rpartition(infix)
        if sep and head.startswith(".") and pid.isdigit():
            return True
    return False


def run_dir_holding(path: Path) -> Path | None:
    """The run dir `path` lies inside (itself excluded), if any."""
    real = _real(path)
    return next((p for p in real.parents if (p / RECIPE).is_file()), None)


# ------------------------------------------------------------------------------------------ reasons


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _never_replaced(path: Path) -> str | None:
    real = _real(path)
    if real == Path(real.anchor):
        return "is the root dir"
    if real == _real(Path(os.path.expanduser("~"))):
        return "is your home dir"
    cwd = _real(Path.cwd())
    if real == cwd:
        return "is the current dir"
    if real in cwd.parents:
        return "holds the current dir"
    return None


def _source_reason(path: Path, sources: Mapping[Path, str], own: Sequence[Path]) -> str | None:
    real = _real(path)
    if any(real == _real(o) for o in own):
        return None
    for source, what in sources.items():
        src = _real(source)
        if real == src:
            return f"is {what}"
        if src in real.parents:
            return f"is inside {source}, {what}"
        if real in src.parents:
            return f"holds {source}, {what}"
    return None


def _run_reason(path: Path, own: Sequence[Path], inside: bool) -> str | None:
    real = _real(path)
    if (real / RECIPE).is_file():
        return f"is an lrft run dir ({RECIPE}, the run's adapter, checkpoints and metrics)"
    if inside and not any(real == _real(o) for o in own):
        around = run_dir_holding(path)
        if around is not None:
            return f"is inside the lrft run dir {around}"
    below = _run_below(path)
    return f"holds the lrft run dir {below}" if below is not None else None


def _run_below(path: Path) -> Path | None:
    """A run dir strictly below `path` (symlinks not followed), found by walking it."""
    real = _real(path)
    if not real.is_dir():
        return None
    for here, dirs, files in os.walk(real):
        if RECIPE in files and Path(here) != real:
            return Path(here)
        dirs.sort()
    return None
