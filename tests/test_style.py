"""The package's house rules, read from its source: every module says its role, no function outgrows a
screen, and no module reaches into another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "lrft"
SOURCES = sorted(PACKAGE.rglob("*.py"))
MAX_FUNCTION_LINES = 60  # one screen, decorators and docstring included


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def name(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


@pytest.mark.parametrize("path", SOURCES, ids=name)
def test_every_module_opens_with_a_docstring(path):
    assert ast.get_docstring(tree(path)), f"{name(path)}: say the module's role in a docstring"


@pytest.mark.parametrize("path", SOURCES, ids=name)
def test_no_function_is_longer_than_a_screen(path):
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree(path))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{name(path)}: split {', '.join(long)}"


@pytest.mark.parametrize("path", SOURCES, ids=name)
def test_no_module_imports_another_modules_private_names(path):
    private = [
        f"{node.module}.{alias.name}"
        for node in ast.walk(tree(path))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lrft")
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]
    assert not private, f"{name(path)} imports {', '.join(private)}: make the name public where it is defined"
