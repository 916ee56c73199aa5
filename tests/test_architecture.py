"""The package's shape (docs/ARCHITECTURE.md): layers that import one way only, no import cycles.

Every `import` and `from ... import` of an lrft module counts, at the top of a file or inside a
function: a lazy import still ties the two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "lrft"

# Lowest first; a module may import from its own layer and the ones below, never from above.
LAYERS = [
    ["lrft", "lrft.errors", "lrft.console", "lrft.guard", "lrft.files", "lrft.tracking", "lrft.hub"],
    ["lrft.targets"],
    ["lrft.methods"],
    ["lrft.inject", "lrft.loss"],
    ["lrft.models", "lrft.weight_files"],
    ["lrft.data"],
    ["lrft.recipe"],
    ["lrft.adapt"],
    ["lrft.calibrate", "lrft.evaluate", "lrft.checkpoint", "lrft.peft_format", "lrft.parallel"],
    ["lrft.rundir"],
    ["lrft.train", "lrft.merge", "lrft.analysis", "lrft.params", "lrft.evaluate_run", "lrft.sweep"],
    ["lrft.cli"],
]


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """The lrft modules a file imports (a name imported from a package counts when it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lrft"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lrft"))
    return found & known


def layer_of(module: str) -> int:
    if module == "lrft.__main__":
        return len(LAYERS) - 1  # `python -m lrft`: the CLI's own entry point
    best = None
    for i, layer in enumerate(LAYERS):
        for name in layer:
            if module == name or (name != "lrft" and module.startswith(name + ".")):
                best = i
    assert best is not None, f"{module} is in no layer of LAYERS (and docs/ARCHITECTURE.md): place it"
    return best


GRAPH = {name: imports(path, set(modules())) - {name} for name, path in modules().items()}


def test_every_module_has_a_layer():
    for name in GRAPH:
        layer_of(name)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_down_the_layers_only(module):
    upward = [dep for dep in GRAPH[module] if layer_of(dep) > layer_of(module)]
    assert not upward, f"{module} (layer {layer_of(module)}) imports {upward} from a higher layer"


def test_no_import_cycles():
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(GRAPH):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles
