"""The one user-facing error type: the CLI prints it as a clear message and exits with code 2.

Anything else that escapes a command is a bug and keeps its traceback (exit code 1).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LrftError(Exception):
    """A user mistake (bad recipe, missing file, wrong argument), explained in one line."""


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
