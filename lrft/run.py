"""An adapted model from a recipe (for training) or from a run dir's own files (for eval and merge).

`lrft eval` and `lrft merge` need no flags: the run dir holds the resolved recipe and an adapter
config naming the method, its resolved params, the exact target modules and per-module meta.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from torch import nn

from lrft import __version__, console, methods
from lrft.checkpoint import load_adapter
from lrft.data import Task, get_task
from lrft.errors import LrftError
from lrft.inject import inject, load_saved_state, set_head_trainable
from lrft.methods.base import BuildContext, Built, Target
from lrft.models import default_targets, find_targets, load_model, weights_checksum
from lrft.recipe import Recipe, validate

RECIPE_FILE = "recipe.yaml"
ADAPTER_DIR = "adapter"


@dataclass
class Base:
    """A loaded base model, its tokenizer and the Linear layers the recipe targets."""

    model: nn.Module
    tokenizer: object
    targets: list[Target]
    task: Task
    label_names: list[str] | None
    fingerprint: str  # checksum of the target weights: an adapter is refused on a base that differs


@dataclass
class Adapted(Base):
    """A base model with adapters injected, and what built them."""

    built: Built
    method: methods.Method
    params: object


def load_base(recipe: Recipe, task: Task, label_names: list[str] | None) -> Base:
    """Load the base model with the head the task needs, and find the targets; check the rank fits them."""
    model, tokenizer = load_model(recipe.model, task, label_names)
    patterns = recipe.adapter.target_modules or default_targets(model.config)
    targets = find_targets(model, patterns)
    check_rank(recipe.method_params().rank, targets)
    return Base(model, tokenizer, targets, task, label_names, weights_checksum(targets))


def adapt(base: Base, recipe: Recipe, calibration=None, saved_meta: dict | None = None) -> Adapted:
    """Build the method's adapters (from calibration statistics, or a saved adapter's meta) and inject them."""
    method = methods.get(recipe.adapter.method)
    params = recipe.method_params()
    ctx = BuildContext(seed=recipe.seed, model_config=base.model.config, calibration=calibration, saved_meta=saved_meta)
    built = method.build(base.targets, params, ctx)
    inject(base.model, base.targets, built)
    set_head_trainable(base.model, recipe.train.train_head)
    return Adapted(base.model, base.tokenizer, base.targets, base.task, base.label_names, base.fingerprint, built, method,
                   params)


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
                       "commit": getattr(a.model.config, "_commit_hash", None), "gguf_file": recipe.model.gguf_file,
                       "model_type": a.model.config.model_type, "dtype": recipe.model.dtype,
                       "fingerprint": a.fingerprint},
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


def check_fingerprint(config: dict, base: Base, source, force: bool) -> None:
    """Refuse (or, with force, warn about) an adapter whose base model's target weights differ from this one's."""
    expected = (config.get("base_model") or {}).get("fingerprint")
    if expected is None or expected == base.fingerprint:
        return
    what = (f"{source}: the adapter was trained on a base model whose target weights differ from those of "
            f"{config['base_model'].get('name')!r} now (fingerprint {expected} vs {base.fingerprint})")
    if not force:
        raise LrftError(f"{what}; load the base it was trained on, or pass --force to use this one anyway")
    console.warn(f"{what}; going on because of --force")


def load_run(run_dir: Path, adapter_dir: Path | None = None, force: bool = False) -> tuple[Recipe, Adapted, dict]:
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
    base = load_base(recipe, get_task(config["task"]), config.get("label_names"))
    check_fingerprint(config, base, adapter_dir, force)
    a = adapt(base, recipe, saved_meta=config.get("meta"))
    load_saved_state(a.model, state, str(adapter_dir))
    a.model.eval()
    return recipe, a, config
