"""The method registry: the single place a new adapter method is added."""

from __future__ import annotations

from lrft.errors import unknown_choice
from lrft.methods import lora, lorta, talora, tlora
from lrft.methods.base import Adapter, BuildContext, Built, Method, MethodParams

REGISTRY: dict[str, Method] = {m.name: m for m in (lora.METHOD, tlora.METHOD, talora.METHOD, lorta.METHOD)}


def get(name: str) -> Method:
    """The method called `name`; an LrftError with a did-you-mean otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise unknown_choice("adapter.method", name, REGISTRY) from None


__all__ = ["REGISTRY", "get", "Adapter", "BuildContext", "Built", "Method", "MethodParams"]
