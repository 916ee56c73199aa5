"""Where lrft talks: results on stdout, logs and progress on stderr, only from the main process.

Progress of a phase (training, evaluation, generation, calibration, a merge, an analysis) goes through
`progress` / `track`: a transient rich bar on a terminal (phases inside phases share one display), a
plain line every PLAIN_EVERY_S seconds otherwise (logs of a cluster job), nothing on stdout.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from rich.console import Console

err = Console(stderr=True, highlight=False, soft_wrap=True)
_main_process = True
PLAIN_EVERY_S = 30.0  # without a terminal, a phase prints where it stands at most this often
_live: dict = {}  # the rich Progress display shared by the phases open on a terminal, and their count


def set_main_process(is_main: bool) -> None:
    """Under several processes only the main one logs."""
    global _main_process
    _main_process = is_main


def log(message: str) -> None:
    if _main_process:
        err.print(message, markup=False)


def warn(message: str) -> None:
    if _main_process:
        err.print(f"warning: {message}", markup=False, style="yellow")


def error(message: str) -> None:
    """A user's mistake or a failed disk, as one `error:` line: said by whichever process met it."""
    err.print(f"error: {message}", markup=False, style="red")


def interactive() -> bool:
    return sys.stderr.isatty()


def emit_lines(lines: Iterable[str]) -> None:
    """A result on stdout, as lines for people."""
    if _main_process:
        sys.stdout.write("".join(f"{line}\n" for line in lines))
        sys.stdout.flush()


def emit_json(obj) -> None:
    """A result on stdout for pipelines (`--json`)."""
    if _main_process:
        sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
        sys.stdout.flush()


def duration(seconds: float) -> str:
    """12:49 (minutes:seconds), 1:02:03 from an hour on."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Phase:
    """Where one phase stands: `advance` after each unit of work (a batch, a module, a step)."""

    def __init__(self, label: str, total: int, unit: str, done: int, plain_lines: bool):
        self.label, self.total, self.unit, self.done = label, total, unit, done
        self.plain_lines = plain_lines and _main_process and not interactive()
        self.started = self.last_line = time.monotonic()
        self.bar = None
        if _main_process and interactive():
            self.bar = _shared_display()
            self.task = self.bar.add_task(label, total=total, completed=done, note="")

    def advance(self, n: int = 1, note: str | None = None) -> None:
        self.update(self.done + n, note)

    def update(self, done: int, note: str | None = None) -> None:
        self.done = done
        if self.bar is not None:
            self.bar.update(self.task, completed=done, **({"note": note} if note is not None else {}))
        elif self.plain_lines and time.monotonic() - self.last_line >= PLAIN_EVERY_S:
            self.last_line = time.monotonic()
            log(self.plain_line(note))

    def plain_line(self, note: str | None) -> str:
        elapsed = time.monotonic() - self.started
        left = elapsed / self.done * (self.total - self.done) if self.done else None
        return (
            f"{self.label}: {self.done}/{self.total} {self.unit}, {duration(elapsed)} elapsed"
            + (f", about {duration(left)} left" if left is not None else "")
            + (f" ({note})" if note else "")
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.remove_task(self.task)
            _release_display()


@contextmanager
def progress(
    label: str, total: int, unit: str = "batches", *, done: int = 0, plain_lines: bool = True
) -> Iterator[Phase]:
    """A phase of `total` units; `plain_lines=False` for phases that log their own lines off a terminal."""
    phase = Phase(label, total, unit, done, plain_lines)
    try:
        yield phase
    finally:
        phase.close()


def track(items: Iterable, label: str, unit: str, total: int | None = None) -> Iterator:
    """The items, with a phase's progress advanced after each."""
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    with progress(label, len(items) if total is None else total, unit) as phase:
        for item in items:
            yield item
            phase.advance()


def _shared_display():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if not _live:
        _live["display"] = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[note]}"),
            console=err,
            transient=True,
        )
        _live["display"].start()
        _live["open"] = 0
    _live["open"] += 1
    return _live["display"]


def _release_display() -> None:
    _live["open"] -= 1
    if _live["open"] == 0:
        _live.pop("display").stop()
        _live.clear()
