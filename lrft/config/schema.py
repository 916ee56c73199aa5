"""How a pydantic schema's fields nest: what the value at a key of a config file is validated as.

A field is a section (a model of its own), a mapping of sections (any key, each value one section: a
sweep's search), a discriminated union of sections (one variant per value of a key inside it: a
recipe's `adapter`, by `method`), or a plain value. pydantic names an error inside a union's variant
with the variant's tag (adapter.tlora.params...), which is no key of the file; `walk` drops it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeGuard, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo


@dataclass(frozen=True)
class Keyed:
    """A mapping of sections: any key, each value a `section`."""

    section: type[BaseModel]


@dataclass(frozen=True)
class Tagged:
    """A discriminated union of sections: the value of `discriminator` inside one picks its variant."""

    discriminator: str
    variants: dict[str, type[BaseModel]]  # tag (the discriminator's value) → variant

    @classmethod
    def of(cls, discriminator: str, annotation) -> Tagged:
        members = get_args(annotation) or (annotation,)
        return cls(
            discriminator,
            {tag: variant for variant in members for tag in get_args(variant.model_fields[discriminator].annotation)},
        )

    @property
    def base(self) -> type[BaseModel]:
        """The class every variant derives from: the keys all variants share, whichever is given."""
        first, *others = self.variants.values()
        return next(c for c in first.__mro__ if all(issubclass(v, c) for v in others))


Node = type[BaseModel] | Keyed | Tagged | None  # None: a plain value (or no field at all)


def is_section(annotation) -> TypeGuard[type[BaseModel]]:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def field_node(field: FieldInfo | None) -> Node:
    """What a field's value is validated as, seen as a config file's structure."""
    if field is None:
        return None
    if isinstance(field.discriminator, str):
        return Tagged.of(field.discriminator, field.annotation)
    annotation = field.annotation
    if get_origin(annotation) is dict:
        value = get_args(annotation)[1]
        return Keyed(value) if is_section(value) else None
    return annotation if is_section(annotation) else None


def step(node: Node, part: str) -> Node:
    """The node at key `part` inside `node`."""
    if isinstance(node, Keyed):
        return node.section
    if isinstance(node, Tagged):  # a union's key with no tag given: the keys every variant has
        node = node.base
    return field_node(node.model_fields.get(part)) if is_section(node) else None


def walk(root: type[BaseModel], loc: tuple) -> tuple[tuple[str, ...], Node]:
    """A pydantic location as the file's keys (the tags of union variants dropped), and the node there."""
    keys: list[str] = []
    node: Node = root
    for part in (str(p) for p in loc):
        if isinstance(node, Tagged) and part in node.variants:
            node = node.variants[part]
            continue
        keys.append(part)
        node = step(node, part)
    return tuple(keys), node


def section_fields(node: Node) -> list[str]:
    """The keys a section at `node` takes ([] for a plain value)."""
    if isinstance(node, Keyed):
        node = node.section
    if isinstance(node, Tagged):
        node = node.base
    return list(node.model_fields) if is_section(node) else []
