"""The docs pages generated from the code they document, so that they cannot drift from it.

    python docs/generate.py          write every generated page that changed
    python docs/generate.py --check  write nothing; exit 1 naming each committed page that differs

A page is a path (from the repository root) and the function that produces its text: add one to PAGES.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

import lrft
from lrft.config.reference import reference_markdown
from lrft.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(lrft.__file__).parent
TABLE_START = "<!-- generated from docs/layers.yaml by `python docs/generate.py`; edit that file, not this table -->"
TABLE_END = "<!-- end of the generated layer table -->"


def recipe_reference() -> str:
    return reference_markdown(
        Recipe,
        "Recipe keys",
        [
            (
                "Every key of a recipe, generated from its schema (`lrft/recipe.py`) by `python docs/generate.py`: the "
                "descriptions are the comments `lrft init` writes. A key marked required must be given; every other key "
                "has the default shown."
            ),
            (
                "Any key can be set on the command line too, as an override of the recipe's value: "
                "`lrft train recipe.yaml train.lr=1e-3 adapter.params.rank=16` (values are YAML)."
            ),
            "The keys of `adapter.params` depend on `adapter.method`: one table per method below.",
        ],
    )


def architecture() -> str:
    """docs/ARCHITECTURE.md with its layer table written from docs/layers.yaml (the prose around it is kept)."""
    page = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    before, rest = page.split(TABLE_START + "\n", 1)
    after = rest.split(TABLE_END, 1)[1]
    layers = yaml.safe_load((ROOT / "docs" / "layers.yaml").read_text(encoding="utf-8"))
    rows = ["| layer | modules | owns |", "| --- | --- | --- |"]
    for number, layer in enumerate(layers):
        names = ", ".join(f"`{module_label(m)}`" for m in layer)
        rows.append(f"| {number} | {names} | {'; '.join(layer.values())} |")
    return before + TABLE_START + "\n" + "\n".join(rows) + "\n" + TABLE_END + after


def module_label(module: str) -> str:
    """`lrft.data` → `data/` (a package), `lrft.errors` → `errors`, `lrft` → `lrft` (its __init__)."""
    if module == "lrft":
        return module
    relative = module.removeprefix("lrft.").replace(".", "/")
    return relative + "/" if (PACKAGE / relative).is_dir() else relative


PAGES: dict[str, Callable[[], str]] = {
    "docs/recipe-reference.md": recipe_reference,
    "docs/ARCHITECTURE.md": architecture,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write the docs pages generated from the code")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a committed page differs")
    args = parser.parse_args(argv)
    stale = []
    for page, generate in PAGES.items():
        path, text = ROOT / page, generate()
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        if args.check:
            stale.append(page)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {page}")
    for page in stale:
        print(f"{page}: differs from what the code generates; run `python docs/generate.py`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
