"""A Markdown reference of a config file's keys, generated from its pydantic schema: one table per
section (key, type, default, description), the descriptions being those `lrft init` writes as
comments, so the reference cannot drift from the schema. A discriminated union (a recipe's `adapter`,
one variant per method) gets one table of the keys its variants share and, for each section that
differs between them (`adapter.params`), one table per variant.
"""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from lrft.config.schema import Keyed, Node, Tagged, field_node, is_section
from lrft.config.yaml_files import flow_yaml

TABLE_HEAD = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null", Any: "any"}


def reference_markdown(root: type[BaseModel], title: str, intro: list[str]) -> str:
    """The reference page of files validated as `root`: `title`, the `intro` paragraphs, then the tables."""
    lines = [f"# {title}", ""]
    for paragraph in intro:
        lines += [paragraph, ""]
    emit_tables(root, "", "Top level", 2, lines)
    return "\n".join(lines).rstrip() + "\n"


def emit_tables(model: type[BaseModel], prefix: str, heading: str, level: int, lines: list[str]) -> None:
    """The table of `model`'s keys (dotted after `prefix`) under `heading`, then one per section in it."""
    lines += [f"{'#' * level} {heading}", "", *TABLE_HEAD]
    inner = []
    for name, field in model.model_fields.items():
        node = field_node(field)
        lines.append(row(prefix + name, field, node))
        if node is not None:
            inner.append((prefix + name, node))
    lines.append("")
    emit_inner(inner, level if not prefix else min(level + 1, 6), lines)  # the root's sections: its peers


def emit_inner(inner: list[tuple[str, Node]], level: int, lines: list[str]) -> None:
    """The tables of the sections at these keys, under headings of `level`."""
    for key, node in inner:
        if isinstance(node, Tagged):
            emit_union(node, key, level, lines)
        elif isinstance(node, Keyed):
            emit_tables(node.section, f"{key}.<key>.", f"`{key}.<key>`", level, lines)
        elif is_section(node):
            emit_tables(node, f"{key}.", f"`{key}`", level, lines)


def emit_union(union: Tagged, key: str, level: int, lines: list[str]) -> None:
    """The keys every variant has, then each section that differs between variants, once per variant."""
    base, inner = union.base, []
    varying = [
        name
        for name, field in base.model_fields.items()
        if name != union.discriminator
        and any(
            is_section(field_node(variant.model_fields[name]))
            and variant.model_fields[name].annotation is not field.annotation
            for variant in union.variants.values()
        )
    ]
    lines += [f"{'#' * level} `{key}`", "", *TABLE_HEAD]
    for name, field in base.model_fields.items():
        if name == union.discriminator:
            lines.append(
                cells(f"{key}.{name}", choices_text(list(union.variants)), default_text(field), field.description)
            )
        elif name in varying:
            lines.append(
                cells(
                    f"{key}.{name}",
                    f"section, by {union.discriminator}",
                    f"per {union.discriminator}",
                    field.description,
                )
            )
        else:
            lines.append(row(f"{key}.{name}", field, field_node(field)))
            inner.append((f"{key}.{name}", field_node(field)))
    lines.append("")
    emit_inner(inner, min(level + 1, 6), lines)
    for name in varying:
        for tag, variant in union.variants.items():
            node = field_node(variant.model_fields[name])
            if is_section(node):
                emit_tables(
                    node,
                    f"{key}.{name}.",
                    f"`{key}.{name}` for `{union.discriminator}: {tag}`",
                    min(level + 1, 6),
                    lines,
                )


def row(key: str, field: FieldInfo, node: Node) -> str:
    kind = type_text(field.annotation) if node is None else "section"
    if isinstance(node, Tagged):
        kind = f"section, by {node.discriminator}"
    elif isinstance(node, Keyed):
        kind = "mapping of sections"
    return cells(key, kind, default_text(field), field.description)


def cells(key: str, kind: str, default: str, description: str | None) -> str:
    return f"| `{key}` | {kind} | {default} | {markdown_text(description or '')} |"


def type_text(annotation) -> str:
    """A type as a YAML writer reads it: 'integer or null', 'one of: `linear`, `cosine`', 'list of string'."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return choices_text(list(args))
    if origin in (Union, types.UnionType):
        return " or ".join(type_text(a) for a in args)
    if origin is list:
        return f"list, each {type_text(args[0])}" if get_origin(args[0]) is Literal else f"list of {type_text(args[0])}"
    if origin is dict:
        return f"mapping of {type_text(args[0])} to {type_text(args[1])}"
    if is_section(annotation):
        return "section"
    return TYPE_NAMES.get(annotation, markdown_text(getattr(annotation, "__name__", str(annotation))))


def choices_text(choices: list) -> str:
    return "one of: " + ", ".join(f"`{flow_yaml(c)}`" for c in choices)


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    return "defaults below" if isinstance(value, BaseModel) else f"`{flow_yaml(value)}`"


def markdown_text(text: str) -> str:
    """Text safe in a Markdown table cell: pipes split no cell, `<name>` is no HTML tag."""
    return text.replace("|", r"\|").replace("<", "&lt;").replace(">", "&gt;")
