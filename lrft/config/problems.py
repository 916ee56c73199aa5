"""pydantic's ValidationError as what a user reads: one line per problem of a config file, each named
by its dotted key, in pydantic's order, and all of them in one ConfigError.

Generic over the file's schema (a recipe, a sweep spec): an unknown key gets a did-you-mean and the
keys known there, a discriminated union's wrong tag is named as an unknown value of its discriminator
(`adapter.method: unknown method ...`), a section given as a scalar says it should be a mapping, and a
validator's own message is kept as it is. What differs between files is passed in: what the whole file
is called, and which keys choose among many registered names (`data.task`) and are answered with a
did-you-mean rather than pydantic's list of every choice.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TypeVar, get_args

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from lrft.config.overrides import override_of
from lrft.config.schema import Node, Tagged, is_section, section_fields, walk
from lrft.errors import ConfigError, did_you_mean

Model = TypeVar("Model", bound=BaseModel)


@dataclass(frozen=True)
class Problem:
    key: str  # the dotted key of the file it is about ('' for the whole file)
    text: str  # the line the user reads


@dataclass(frozen=True)
class ErrorAt:
    """One of pydantic's errors, placed in the file."""

    error: ErrorDetails  # pydantic's: type, loc, msg, input
    root: type[BaseModel]
    keys: tuple[str, ...]  # the location as the file's keys
    node: Node  # what the value there is validated as
    where: str  # the keys dotted, or what the whole file is called
    named_choices: Collection[str]

    @property
    def given(self):
        return self.error["input"]


def validated(
    root: type[Model],
    raw: dict,
    source: str | None,
    overridden: dict[str, str] | None = None,
    *,
    whole: str,
    named_choices: Collection[str] = (),
) -> Model:
    """`raw` validated as `root`, or a ConfigError listing every problem found. A problem of a key that a
    command-line override set (`overridden`: dotted key → the override) is named as the override's, and
    the error names `source` only when some problem is in the file itself."""
    try:
        return root.model_validate(raw)
    except ValidationError as e:
        lines, from_file = [], not overridden
        for problem in problems(e, root, whole=whole, named_choices=named_choices):
            item = override_of(problem.key, overridden or {})
            lines.append(f"override {item!r}: {problem.text}" if item else problem.text)
            from_file = from_file or item is None
        raise ConfigError(lines, source if from_file else None) from None


def problems(
    err: ValidationError, root: type[BaseModel], *, whole: str, named_choices: Collection[str] = ()
) -> list[Problem]:
    """One Problem per error of `err` (raised validating as `root`), in the errors' order. `whole`: what
    a problem of the whole file is named by; `named_choices`: dotted keys holding one of many names."""
    out = []
    for error in err.errors():
        keys, node = walk(root, error["loc"])
        at = ErrorAt(error, root, keys, node, ".".join(keys) or whole, named_choices)
        out.append(Problem(".".join(keys), DESCRIBE.get(error["type"], pydantic_message)(at)))
    return out


def unknown_key(at: ErrorAt) -> str:
    known = section_fields(walk(at.root, at.error["loc"][:-1])[1])
    return f"{at.where}: unknown key{did_you_mean(at.keys[-1], known)}" + (
        f"; known keys here: {', '.join(known)}" if known else ""
    )


def missing(at: ErrorAt) -> str:
    return f"{at.where}: required, but missing"


def missing_tag(at: ErrorAt) -> str:
    return f"{at.where}.{union_at(at).discriminator}: required, but missing"


def unknown_tag(at: ErrorAt) -> str:
    union = union_at(at)
    key, tag = f"{at.where}.{union.discriminator}", at.given.get(union.discriminator)
    if not isinstance(tag, str):
        return f"{key}: input should be a valid string (got {tag!r})"
    return unknown_choice(key, union.discriminator, tag, list(union.variants))


def union_at(at: ErrorAt) -> Tagged:
    """The discriminated union a union_tag error is about (pydantic raises them at the union's key)."""
    assert isinstance(at.node, Tagged), at.error
    return at.node


def unknown_literal(at: ErrorAt) -> str:
    """A named choice (data.task) as 'unknown task' with a did-you-mean; another literal as pydantic says."""
    if at.where not in at.named_choices or not isinstance(at.given, str):
        return pydantic_message(at)
    section = walk(at.root, at.error["loc"][:-1])[1]
    assert is_section(section), at.error
    choices = list(get_args(section.model_fields[at.keys[-1]].annotation))
    return unknown_choice(at.where, at.keys[-1], at.given, choices)


def unknown_choice(where: str, noun: str, value: str, choices: list[str]) -> str:
    return f"{where}: unknown {noun} {value!r}{did_you_mean(value, choices)}; choose one of: {', '.join(choices)}"


def not_a_mapping(at: ErrorAt) -> str:
    return f"{at.where}: input should be a valid dictionary (got {at.given!r})"


def own_message(at: ErrorAt) -> str:
    """A validator's ValueError: its message names its keys itself."""
    return str(at.error["msg"]).removeprefix("Value error, ")


def pydantic_message(at: ErrorAt) -> str:
    msg = at.error["msg"]
    return f"{at.where}: {msg[0].lower()}{msg[1:]} (got {at.given!r})"


DESCRIBE: dict[str, Callable[[ErrorAt], str]] = {  # pydantic's error type → its line; others: pydantic_message
    "extra_forbidden": unknown_key,
    "missing": missing,
    "union_tag_not_found": missing_tag,
    "union_tag_invalid": unknown_tag,
    "literal_error": unknown_literal,
    "model_type": not_a_mapping,  # a section given as something other than a mapping
    "value_error": own_message,
}
