"""The package's shape (docs/ARCHITECTURE.md): layers that import one way only, no import cycles.

Every `import` and `from ... import` of an lrft module counts, at the top of a file or inside a
function: a lazy import still ties the two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.helpers import docs_generator

PACKAGE = Path(__file__).parents[1] / "lrft"

# Lowest first; a module may import from its own layer and the ones below, never from above. The same
# file writes the layer table of docs/ARCHITECTURE.md (docs/generate.py), so the two cannot drift.
LAYERS = [
    list(layer) for layer in yaml.safe_load((PACKAGE.parent / "docs" / "layers.yaml").read_text(encoding="utf-8"))
]


def test_the_layer_table_of_the_docs_is_written_from_the_same_file():
    """docs/ARCHITECTURE.md's table is what `python docs/generate.py` writes from docs/layers.yaml."""
    generate = docs_generator()
    committed = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    assert committed == generate.architecture(), "run: python docs/generate.py"


def modules() -> dict[str, Path]:
    return {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in PACKAGE.rglob("*.py")
    }


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
    assert best is not None, f"{module} is in no layer of docs/layers.yaml: place it there"
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
                cycles.append(" -> ".join(path[path.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(GRAPH):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def assigned_attributes(function: ast.FunctionDef) -> set[str]:
    """The names X of every `self.X = ...` (plain, annotated, augmented or unpacked) in a method."""
    found = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        else:
            continue
        for target in targets:
            for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    found.add(t.attr)
    return found


def test_the_trainer_state_is_set_up_front():
    """Every attribute of the Trainer is first set in `__init__`, but the Plan, which `setup` sets once:
    no step of the run adds state that a later one silently depends on."""
    tree = ast.parse((PACKAGE / "training" / "loop.py").read_text(encoding="utf-8"))
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    methods = {f.name: assigned_attributes(f) for f in trainer.body if isinstance(f, ast.FunctionDef)}
    set_up_front = methods.pop("__init__")
    later = {(method, attr) for method, attrs in methods.items() for attr in attrs - set_up_front}
    assert later == {("setup", "plan")}, f"Trainer attributes first set outside __init__: {sorted(later)}"
