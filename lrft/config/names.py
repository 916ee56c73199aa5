"""Names a config file gives (a run's, a sweep's, a list of labels or layers): what makes them usable."""

from __future__ import annotations

import re

PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # one path component, never '..'


def is_plain_name(name: str) -> bool:
    """Letters, digits, '.', '_', '-', not starting with '.', '_' or '-': safe as a dir name anywhere."""
    return bool(PLAIN_NAME.match(name))


def plain_name_problem(name: str, noun: str, *, refused: str = "", max_length: int | None = None) -> str | None:
    """What is wrong with `name` as a plain `noun` (too long: above `max_length`), if anything; `refused`
    adds what is refused to the rule ("; no '/' or '..'")."""
    if not is_plain_name(name):
        return f"{name!r} is not a plain {noun} (letters, digits, '.', '_', '-'{refused})"
    if max_length is not None and len(name) > max_length:
        return f"{name[:24]!r}… is {len(name)} characters long; use a {noun} of at most {max_length}"
    return None


def distinct_names_problem(names: list[str]) -> str | None:
    """What is wrong with a list of names that must be distinct and non-empty, if anything."""
    if any(not n.strip() for n in names):
        return f"{names!r} holds an empty name"
    twice = sorted({n for n in names if names.count(n) > 1})
    return f"{twice[0]!r} is listed twice" if twice else None
