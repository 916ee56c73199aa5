"""`key=value` overrides of a config file's mapping, and the dotted keys (`train.lr`) they name.

An override's value is YAML (`8` is an int, `[query, value]` a list, nothing is null); its key walks
the mapping's sections, making the missing ones. A problem later found with a value an override set is
named as that override's (`override_of`), so the user is sent to the command line, not to the file.
"""

from __future__ import annotations

from typing import Any

from lrft.config.yaml_files import parse_yaml
from lrft.errors import LrftError


def dotted_get(tree: dict, key: str) -> Any:
    """The value at a dotted key (`train.lr`), or None where a part is missing or not a section."""
    node: Any = tree
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def dotted_pop(tree: dict, key: str) -> None:
    """Remove the value at a dotted key, if there is one."""
    parent, _, leaf = key.rpartition(".")
    section = dotted_get(tree, parent) if parent else tree
    if isinstance(section, dict):
        section.pop(leaf, None)


def apply_overrides(raw: dict, overrides: list[str]) -> dict[str, str]:
    """Apply `a.b.c=value` overrides in place; values are parsed as YAML (8 → int, [q,v] → list).
    Returns each dotted key with the override that set it."""
    overridden = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise LrftError(f"override {item!r}: expected key=value, e.g. train.lr=1e-3")
        parts = key.split(".")
        section = overridden_section(raw, parts, item)
        section[parts[-1]] = parse_yaml(value, f"override {item!r}") if value else None
        overridden[key] = item
    return overridden


def overridden_section(raw: dict, parts: list[str], item: str) -> dict:
    """The section of `raw` an override of the key `parts` sets a value in, made where missing."""
    node = raw
    for depth, part in enumerate(parts[:-1], 1):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise LrftError(f"override {item!r}: '{part}' is not a section; set {'.'.join(parts[:depth])}=... itself")
        node = child
    return node


def override_of(key: str, overridden: dict[str, str]) -> str | None:
    """The override that set the dotted key `key` (or a section above it), if one did."""
    return next((item for set_key, item in overridden.items() if key == set_key or key.startswith(set_key + ".")), None)
