"""Opening what `lrft eval`, `merge`, `analyze` and `count-params --calibrated` work on: a run dir
(its recipe, its adapter config, its trained adapter on its base model), or a PEFT LoRA adapter dir;
and where they read a task's examples from. The run dir's layout is lrft.run_layout's.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from lrft import console
from lrft.adapted_model import Opened, adapt, check_fingerprint, load_base
from lrft.atomic_files import read_json
from lrft.checkpoint import CONFIG_FILE, load_adapter, read_adapter_config
from lrft.data import DATA_DIR_ENV, HUB_SOURCE, Task, get_task, local_source
from lrft.data.text_to_text import task_for
from lrft.errors import LrftError
from lrft.inject import load_saved_state
from lrft.models import ALIASES, looks_local
from lrft.peft_format import is_peft_dir, load_peft
from lrft.recipe import DataConfig, Recipe, read_recipe_mapping, validate
from lrft.run_layout import MERGE_REPORT, RECIPE, RunDir


def read_run_recipe(run_dir: Path) -> Recipe:
    """The recipe a run dir holds; a path that is not a run dir is refused saying what to give."""
    run = RunDir(run_dir)
    if not run.path.exists():
        raise LrftError(f"{run.path}: no such directory; give the run dir `lrft train` wrote")
    if not run.is_run():
        raise LrftError(f"{run.path}: not an lrft run dir (no {RECIPE}); give the dir `lrft train` wrote")
    return validate(read_recipe_mapping(run.recipe), source=str(run.recipe))


def trained_adapter_config(run_dir: Path) -> dict:
    """adapter/adapter_config.json of a finished run, read without loading any model."""
    read_run_recipe(run_dir)  # a clear error for a dir that is not a run dir
    run = RunDir(run_dir)
    check_trained(run, run.adapter)
    return read_adapter_config(run.adapter)


def check_trained(run: RunDir, adapter_dir: Path) -> None:
    """Refuse a run whose adapter (final or best) is not written yet: the run has not finished."""
    if not (adapter_dir / CONFIG_FILE).is_file():
        raise LrftError(
            f"{run.path}: no trained adapter in {adapter_dir}; the run has not finished "
            f"(rerun `lrft train` on its recipe to resume it)"
        )


def load_run(run_dir: Path, *, best: bool = False, force: bool = False) -> Opened:
    """The run's base model with its trained adapter (and head) loaded, ready to evaluate or merge."""
    run = RunDir(run_dir)
    recipe = read_run_recipe(run.path)
    adapter_dir = run.best_adapter if best else run.adapter
    check_trained(run, adapter_dir)
    state, config = load_adapter(adapter_dir)
    if config.get("method") != recipe.adapter.method:
        raise LrftError(
            f"{adapter_dir}: adapter of method {config.get('method')!r} but the run's recipe says "
            f"{recipe.adapter.method!r}; the run dir was mixed with another run's files"
        )
    recipe.adapter.target_modules = config["target_modules"]
    base = load_base(
        recipe.model,
        task_for(config["task"], recipe.data.format),
        config.get("label_names"),
        recipe.adapter.target_modules,
        recipe.adapter.params.rank,
    )
    check_fingerprint(config, base, adapter_dir, force)
    a = adapt(base, recipe, saved_meta=config.get("meta"))
    load_saved_state(a.model, state, str(adapter_dir))
    a.model.eval()
    return Opened(a, config, recipe.model, recipe.data, run.path)


def open_adapted(
    name: str | Path, *, task: str | None = None, base: str | None = None, force: bool = False, best: bool = False
) -> Opened | None:
    """An lrft run dir or a PEFT LoRA dir, opened on its base model; None for anything else (a model).

    A name meant as a path (models.looks_local) that is not there is refused at once, never tried as a
    hub id."""
    target = Path(name).expanduser()
    if not target.exists() and looks_local(str(name)):
        raise LrftError(
            f"{name}: no such directory; give a run dir of `lrft train`, a PEFT adapter dir, a model "
            f"dir, an alias ({', '.join(ALIASES)}) or a hub id"
        )
    if RunDir(target).is_run():
        opened = load_run(target, best=best, force=force)
        if task and task != opened.adapted.task.name and _both_generate(opened.adapted.task, get_task(task)):
            return _on_task(opened, get_task(task))
        if task and task != opened.adapted.task.name:
            raise LrftError(
                f"--task: the run was trained on {opened.adapted.task.name}, not {task}; leave out --task to "
                f"use the run's task (a causal LM's run can be scored on another causal-LM task)"
            )
        return opened
    if is_peft_dir(target):
        return load_peft(target, task, base, force)
    return None


def _both_generate(trained: Task, other: Task) -> bool:
    """Whether a run trained on one task can be scored on the other: both prompt a causal LM for a response."""
    return trained.problem == other.problem == "causal_lm"


def _on_task(opened: Opened, task: Task) -> Opened:
    """A causal LM's run scored on another causal-LM task (an instruction run on HumanEval, a math run
    on the commonsense suite): that task's own data and defaults, not the run's training files."""
    data_cfg = DataConfig(task=task.name, max_length=task.max_length, max_new_tokens=task.max_new_tokens)
    config = {k: v for k, v in opened.config.items() if k != "data_source"}
    return replace(opened, adapted=replace(opened.adapted, task=task), config=config, data_cfg=data_cfg)


def data_settings(opened: Opened, data_path: str | None) -> DataConfig:
    """Where eval and merge read the task's examples: `data_path` (--data-path); else the dir the run or
    export was trained on (its adapter config's data_source), while it is there; else the recipe's
    data.path, $LRFT_DATA_DIR or the hub."""
    data = opened.data_cfg.model_copy()
    recorded = opened.config.get("data_source")
    if data_path:
        data.path = data_path
    elif local_source(recorded):
        data.path = recorded
    elif recorded and not recorded.startswith(HUB_SOURCE):
        elsewhere = data.path or (f"${DATA_DIR_ENV}" if os.environ.get(DATA_DIR_ENV) else "the hub")
        console.warn(
            f"{opened.config.get('task')} was trained on the files in {recorded}, which are gone; "
            f"reading them from {elsewhere} (--data-path names another dir)"
        )
    return data


def merged_data_source(model_dir: Path, task: str) -> str | None:
    """The local data dir a merged model dir's parity check read, if it was for `task` and is still there."""
    path = Path(model_dir) / MERGE_REPORT
    if not path.is_file():
        return None
    report = read_json(path, "merge report")
    return local_source(report.get("data_source")) if report.get("task") == task else None
