"""Where lrft talks: logs and progress on stderr (progress bars only on a terminal), results on stdout."""

from __future__ import annotations

import json
import sys

from rich.console import Console

err = Console(stderr=True, highlight=False, soft_wrap=True)
_main_process = True


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


def interactive() -> bool:
    return sys.stderr.isatty()


def emit_json(obj) -> None:
    """A result on stdout for pipelines (`--json`)."""
    if _main_process:
        sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
        sys.stdout.flush()
