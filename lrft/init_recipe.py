"""`lrft init`: a commented recipe for a method, task and model, with every field and its description
(the schema's own text, lrft.config.commented), on stdout or written to a file."""

from __future__ import annotations

from pathlib import Path

from lrft import methods
from lrft.atomic_files import atomic_write_text, check_writable
from lrft.config.commented import commented_yaml
from lrft.data import get_task
from lrft.errors import LrftError
from lrft.guard import check_output
from lrft.recipe import validate


def init_recipe(method: str, task: str, model: str, output: Path | None = None, force: bool = False) -> str:
    """The recipe's text when `output` is None; else the recipe is written there (atomically; an existing
    file only with `force`) and the text is the line that says so."""
    m = methods.get(method)
    if output is not None:
        check_output(output, "--output")
        check_writable(output, "--output", kind="file")
    if output is not None and output.exists() and not force:
        raise LrftError(f"--output: {output} already exists; pass --force to overwrite it")
    name = output.stem if output is not None else f"{task.replace('/', '_')}_{method}"
    recipe = validate(
        {
            "name": name,
            "model": {"name": model},
            "data": {"task": task},
            "adapter": {"method": method, "params": {}},
            "train": {"lr": m.suggested_lr},
        }
    )
    if not get_task(task).causal:  # the head's own lr, written out so a changed lr leaves it be
        recipe.train.head_lr = recipe.train.head_learning_rate
    text = commented_yaml(
        recipe,
        [
            f"lrft recipe: {m.summary}",
            f"run:       lrft train {output or 'recipe.yaml'}",
            f"override:  lrft train {output or 'recipe.yaml'} train.lr=1e-3 adapter.params.rank=16",
        ],
    )
    if output is None:
        return text
    atomic_write_text(output, text)
    return f"wrote {output}\n"
