"""The user-facing error types: the CLI prints each as one clear line and exits with code 2 (LrftError:
a user mistake) or 74 (DiskError: the disk failed under a write).

Anything else that escapes a command is a bug and keeps its traceback (exit code 1).
"""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable
from pathlib import Path

EXIT_DISK = 74  # sysexits' EX_IOERR: the disk failed under a write; nothing half-written, rerun once it is fixed

# What a disk's failure under a write is and what to do before rerunning: the environment failed, not
# the user nor lrft (a read-only file system met before any work is a user's path: lrft.cli's PATH_ERRORS).
DISK_ERRORS = {
    errno.ENOSPC: ("no space left on device", "free space"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota (or have it raised)"),
    errno.EROFS: ("the file system became read-only", "make it writable again (remount it read-write)"),
    errno.EIO: ("an I/O error", "check the disk (dmesg; for a network file system, its server)"),
}


class LrftError(Exception):
    """A user mistake (bad recipe, missing file, wrong argument), explained in one line."""


class DiskError(LrftError):
    """The disk failed under a write (DISK_ERRORS: full, over quota, read-only, an I/O error): an environment
    failure, neither a mistake nor a bug. Writers (lrft.atomic_files) leave nothing half-written, so the same command,
    rerun once the disk is fixed, does the work (a run resumes). Exit code EXIT_DISK.

    `where`: the dir written to; `what`: what was being written; `kept`: what is left that counts (a run's last
    complete checkpoint), `then`: what the rerun does with it."""

    def __init__(self, code: int, where: Path | str, what: str, kept: str = "", then: str = ""):
        self.code, self.where, self.what = code, Path(where), what
        reason, fix = DISK_ERRORS[code]
        super().__init__(
            f"{where}: {reason} while writing {what}; nothing half-written is left{kept}; {fix} and "
            f"rerun the same command{then} (exit code {EXIT_DISK})"
        )


class ConfigError(LrftError):
    """Every problem found in a recipe, reported at once."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        where = f"{self.source}: " if self.source else ""
        if len(self.problems) == 1:
            return f"{where}{self.problems[0]}"
        lines = [f"{where}{len(self.problems)} problems:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' when a choice is close to `word`, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_choice(what: str, value: str, choices: Iterable[str]) -> LrftError:
    """An error for a name that is not one of `choices`, listing them."""
    choices = sorted(choices)
    return LrftError(f"{what}: unknown '{value}'{did_you_mean(value, choices)}; choose one of: {', '.join(choices)}")
