"""Strict YAML: what lrft reads config files with, and how it writes one value on one line.

Files are read with `yaml.safe_load`'s loader, made strict: a key repeated in one mapping is an error
naming the key and both its lines, never the last value silently winning. Every problem (bad syntax,
a duplicate key, nesting too deep to read, bytes that are not UTF-8) is one LrftError naming the source
and the position.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from lrft.errors import LrftError


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping; `first` marks where it was given before, `second` again."""

    def __init__(self, key, first, mark):
        super().__init__(None, None, f"key {key!r} appears twice in one mapping", mark)
        self.key, self.first, self.second = key, first, mark


class StrictLoader(yaml.SafeLoader):
    """`yaml.safe_load`'s loader, except that a key repeated in one mapping is an error: YAML would keep
    the last value silently, and the file would then be used with a setting its author did not see."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden, as YAML says
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = first.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if seen is not None:
                    raise DuplicateKeyError(key, seen, key_node.start_mark)
                first[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str):
    """The value a YAML text holds (None when empty); `source` names the text in the messages (a file's
    path, an override)."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # a SafeLoader: yaml.safe_load's tags only
    except DuplicateKeyError as e:
        raise LrftError(
            f"{source}: key {e.key!r} is given twice in one mapping, at {position(e.first)} and at "
            f"{position(e.second)}; keep one of the two"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at {position(mark)}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LrftError(f"{source}: YAML syntax error{where}: {problem}") from None
    except RecursionError:
        raise LrftError(f"{source}: YAML nested too deeply to read; a recipe is a few levels of mappings") from None


def position(mark: yaml.Mark) -> str:
    """A YAML mark as a person counts: 'line 3, column 1'."""
    return f"line {mark.line + 1}, column {mark.column + 1}"


def read_yaml_mapping(path: Path, kind: str, first_keys: str) -> dict:
    """The mapping a YAML file holds, not yet validated (an empty file: an empty mapping). `kind` says
    what the file is ("a recipe") and `first_keys` what it starts with ("model:, data:, ..."), for the
    messages."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LrftError(f"{path}: not UTF-8 text (byte {e.start}); {kind} is a UTF-8 YAML file") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise LrftError(f"{path}: {kind} is a YAML mapping ({first_keys}), not a {type(raw).__name__}")
    return raw


def flow_yaml(value) -> str:
    """A value as one line of YAML (`[query, value]`, `{rank: 8}`, `0.01`): what an override's value is."""
    return (
        yaml.safe_dump(value, default_flow_style=True, width=10_000, allow_unicode=True, sort_keys=False)
        .removesuffix("...\n")
        .strip()
    )
