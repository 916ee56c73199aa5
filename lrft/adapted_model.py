"""A base model with its adapters: load the base and its targets, build a method's adapters, inject them.

Training builds the adapters from the recipe (and calibration statistics); `lrft eval`, `merge` and
`analyze` rebuild them from a saved adapter config (`saved_meta`: talora's calibrated ranks, lorta's
geometry), so they need no flags. What an adapter config records is written here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from lrft import __version__, console, methods
from lrft.data import TASKS, Task
from lrft.errors import LrftError
from lrft.inject import inject, set_head_trainable
from lrft.methods import BuildContext, Built, MethodParams
from lrft.models import load_model
from lrft.recipe import DataConfig, ModelConfig, Recipe
from lrft.targets import Target, default_targets, find_targets, weights_checksum


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
    params: MethodParams


@dataclass
class Opened:
    """What eval, merge and analyze work on: an adapted model, its adapter config and the model and
    data settings it was trained with (a run's recipe, or those a PEFT dir implies)."""

    adapted: Adapted
    config: dict  # the adapter config
    model_cfg: ModelConfig
    data_cfg: DataConfig
    run_dir: Path | None = None  # None for a PEFT adapter dir


def load_base(
    model_cfg: ModelConfig, task: Task, label_names: list[str] | None, target_modules: list[str] | None, rank: int
) -> Base:
    """Load the base model with the head the task needs, and find the targets; check the rank fits them."""
    model, tokenizer = load_model(model_cfg, task, label_names)
    targets = find_targets(model, target_modules or default_targets(model.config))
    check_rank(rank, targets)
    return Base(model, tokenizer, targets, task, label_names, weights_checksum(targets))


def adapt(base: Base, recipe: Recipe, *, calibration=None, saved_meta: dict | None = None) -> Adapted:
    """Build the recipe's adapters (from calibration statistics, or a saved adapter's meta) and inject them."""
    method = methods.get(recipe.adapter.method)
    params = recipe.adapter.params
    ctx = BuildContext(seed=recipe.seed, model_config=base.model.config, calibration=calibration, saved_meta=saved_meta)
    return attach(base, method.build(base.targets, params, ctx), method, params, train_head=recipe.train.train_head)


def attach(base: Base, built: Built, method: methods.Method, params: MethodParams, *, train_head: bool) -> Adapted:
    """Inject built adapters into the base model: they train, the base is frozen, the head as asked."""
    inject(base.model, base.targets, built)
    set_head_trainable(base.model, train_head)
    return Adapted(
        model=base.model,
        tokenizer=base.tokenizer,
        targets=base.targets,
        task=base.task,
        label_names=base.label_names,
        fingerprint=base.fingerprint,
        built=built,
        method=method,
        params=params,
    )


def check_rank(rank: int, targets: list[Target]) -> None:
    smallest = min(targets, key=lambda t: min(t.shape))
    if rank > min(smallest.shape):
        out_f, in_f = smallest.shape
        raise LrftError(
            f"adapter.params.rank: {rank} is larger than the targeted layer {smallest.name} "
            f"({out_f}×{in_f}); use a rank ≤ {min(smallest.shape)}"
        )


def adapter_config(recipe, a: Adapted, trainable: int, data_source: str) -> dict:
    """What adapter_config.json records: enough to rebuild the adapter on its base model, and where the
    training data came from (`lrft eval` and `merge` read the same data without being told)."""
    return {
        "lrft_version": __version__,
        "method": a.method.name,
        "params": a.params.model_dump(),
        "target_modules": recipe.adapter.target_modules or default_targets(a.model.config),
        "targets": [t.name for t in a.targets],
        "base_model": {
            "name": recipe.model.name,
            "revision": recipe.model.revision,
            "commit": getattr(a.model.config, "_commit_hash", None),
            "gguf_file": recipe.model.gguf_file,
            "model_type": a.model.config.model_type,
            "dtype": recipe.model.dtype,
            "quantize": recipe.model.quantize,  # the fingerprint is of the quantized weights
            "fingerprint": a.fingerprint,
        },
        "task": a.task.name,
        "data_source": data_source,
        "problem": a.task.problem,
        "label_names": a.label_names,
        "head_trained": recipe.train.train_head,
        "trainable_params": trainable,
        "seed": recipe.seed,
        "meta": a.built.meta,
    }


class _SavedBase(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str


class SavedAdapterConfig(BaseModel):
    """What eval, merge, analyze and count-params read back from an adapter_config.json `adapter_config` wrote."""

    model_config = ConfigDict(extra="allow")

    method: Literal[tuple(methods.REGISTRY)]  # type: ignore[valid-type]
    params: dict
    target_modules: list[str] = Field(min_length=1)
    targets: list[str] = Field(min_length=1)
    base_model: _SavedBase
    task: Literal[tuple(TASKS)]  # type: ignore[valid-type]
    problem: str
    label_names: list[str] | None = None
    head_trained: bool = True
    meta: dict | None = None


def check_adapter_config(config: dict, source) -> dict:
    """`config` as read from `source`, if it has what lrft wrote into it; one clear error otherwise."""
    try:
        saved = SavedAdapterConfig.model_validate(config)
        methods.get(saved.method).params.model_validate(saved.params)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "config"
        what = "missing" if first["type"] == "missing" else f"{first['msg'].lower()} (got {repr(first['input'])[:60]})"
        raise LrftError(
            f"{source}: {where}: {what}; the adapter config is damaged: restore it, or retrain the run"
        ) from None
    return config


def check_fingerprint(config: dict, base: Base, source, force: bool) -> None:
    """Refuse (or, with force, warn about) an adapter whose base model's target weights differ from this one's."""
    expected = (config.get("base_model") or {}).get("fingerprint")
    if expected is None or expected == base.fingerprint:
        return
    what = (
        f"{source}: the adapter was trained on a base model whose target weights differ from those of "
        f"{config['base_model'].get('name')!r} now (fingerprint {expected} vs {base.fingerprint})"
    )
    if not force:
        raise LrftError(f"{what}; load the base it was trained on, or pass --force to use this one anyway")
    console.warn(f"{what}; going on because of --force")
