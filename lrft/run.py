"""An adapted model from a recipe (for training) or from a run dir's own files (for eval and merge).

`lrft eval` and `lrft merge` need no flags: the run dir holds the resolved recipe and an adapter
config naming the method, its resolved params, the exact target modules and per-module meta.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from torch import nn

from lrft import __version__, methods
from lrft.checkpoint import load_adapter
from lrft.data import Task, get_task
from lrft.errors import LrftError
from lrft.inject import inject, load_saved_state, set_head_trainable
from lrft.methods.base import BuildContext, Built, Target
from lrft.models import default_targets, find_targets, load_for_classification
from lrft.recipe import Recipe, validate

RECIPE_FILE = "recipe.yaml"
ADAPTER_DIR = "adapter"


@dataclass
class Adapted:
    """A base model with adapters injected, and what built them."""

    model: nn.Module
    tokenizer: object
    targets: list[Target]
    built: Built
    method: methods.Method
    params: object
    task: Task
    label_names: list[str] | None


def build(recipe: Recipe, task: Task, label_names: list[str] | None, calibration=None,
          saved_meta: dict | None = None) -> Adapted:
    """Load the base model, find the targets, build and inject the method's adapters."""
    num_labels = 1 if task.problem == "regression" else len(label_names)
    model, tokenizer = load_for_classification(recipe.model, num_labels, label_names, task.problem == "regression")
    patterns = recipe.adapter.target_modules or default_targets(model.config)
    targets = find_targets(model, patterns)
    method = methods.get(recipe.adapter.method)
    params = recipe.method_params()
    check_rank(params.rank, targets)
    ctx = BuildContext(seed=recipe.seed, model_config=model.config, calibration=calibration, saved_meta=saved_meta)
    built = method.build(targets, params, ctx)
    inject(model, targets, built)
    set_head_trainable(model, recipe.train.train_head)
    return Adapted(model, tokenizer, targets, built, method, params, task, label_names)


def check_rank(rank: int, targets: list[Target]) -> None:
    smallest = min(targets, key=lambda t: min(t.shape))
    if rank > min(smallest.shape):
        out_f, in_f = smallest.shape
        raise LrftError(f"adapter.params.rank: {rank} is larger than the targeted layer {smallest.name} "
                        f"({out_f}×{in_f}); use a rank ≤ {min(smallest.shape)}")


def adapter_config(recipe: Recipe, a: Adapted, trainable: int) -> dict:
    """What adapter_config.json records: enough to rebuild the adapter on its base model."""
    return {
        "lrft_version": __version__,
        "method": a.method.name,
        "params": recipe.adapter.params,
        "target_modules": recipe.adapter.target_modules or default_targets(a.model.config),
        "targets": [t.name for t in a.targets],
        "base_model": {"name": recipe.model.name, "revision": recipe.model.revision,
                       "model_type": a.model.config.model_type, "dtype": recipe.model.dtype},
        "task": a.task.name,
        "problem": a.task.problem,
        "label_names": a.label_names,
        "head_trained": recipe.train.train_head,
        "trainable_params": trainable,
        "seed": recipe.seed,
        "meta": a.built.meta,
    }


def read_recipe(run_dir: Path) -> Recipe:
    path = Path(run_dir) / RECIPE_FILE
    if not path.is_file():
        raise LrftError(f"{run_dir}: not an lrft run dir (no {RECIPE_FILE}); give the dir `lrft train` wrote")
    return validate(yaml.safe_load(path.read_text(encoding="utf-8")), source=str(path))


def load_run(run_dir: Path, adapter_dir: Path | None = None) -> tuple[Recipe, Adapted, dict]:
    """The run's base model with its trained adapter (and head) loaded, ready to evaluate or merge."""
    run_dir = Path(run_dir)
    recipe = read_recipe(run_dir)
    adapter_dir = adapter_dir or run_dir / ADAPTER_DIR
    if not (adapter_dir / "adapter_config.json").is_file():
        raise LrftError(f"{run_dir}: no trained adapter in {adapter_dir}; the run has not finished "
                        f"(rerun `lrft train` on its recipe to resume it)")
    state, config = load_adapter(adapter_dir)
    if config.get("method") != recipe.adapter.method:
        raise LrftError(f"{adapter_dir}: adapter of method {config.get('method')!r} but the run's recipe says "
                        f"{recipe.adapter.method!r}; the run dir was mixed with another run's files")
    recipe.adapter.target_modules = config["target_modules"]
    a = build(recipe, get_task(config["task"]), config.get("label_names"), saved_meta=config.get("meta"))
    load_saved_state(a.model, state, str(adapter_dir))
    a.model.eval()
    return recipe, a, config
