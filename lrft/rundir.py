"""The run dir, a public contract (README "Run dir"): the one place that knows its layout, and opening
what `lrft eval`, `merge` and `analyze` work on: a run dir, or a PEFT LoRA adapter dir.

    <output.dir>/<name>/
      recipe.yaml            the resolved recipe
      metrics.jsonl          a line per logged step and per evaluation
      adapter_stats.jsonl    per epoch and module: ‖ΔW‖_F (and α, ‖B‖_F for tlora)
      summary.json           best and final metrics, counts, times, peak memory
      adapter/ best_adapter/ adapter.safetensors + adapter_config.json
      checkpoints/           resumable checkpoints (lrft.checkpoint)
      calibration/           statistics and plan of methods that calibrate (lrft.calibrate)
      analysis/              `lrft analyze` output
      predictions.jsonl      generations of generation tasks (predictions_step0.jsonl before training)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lrft.adapt import Opened, adapt, check_fingerprint, load_base
from lrft.checkpoint import CONFIG_FILE, load_adapter
from lrft.data import get_task
from lrft.errors import LrftError
from lrft.files import read_json
from lrft.inject import load_saved_state
from lrft.peft_format import is_peft_dir, load_peft
from lrft.recipe import Recipe, parse_yaml, validate

RECIPE = "recipe.yaml"
METRICS = "metrics.jsonl"
ADAPTER_STATS = "adapter_stats.jsonl"
SUMMARY = "summary.json"
ADAPTER = "adapter"
BEST_ADAPTER = "best_adapter"
CHECKPOINTS = "checkpoints"
CALIBRATION = "calibration"
ANALYSIS = "analysis"
PREDICTIONS = "predictions.jsonl"
PREDICTIONS_AT_START = "predictions_step0.jsonl"


@dataclass(frozen=True)
class RunDir:
    """Paths of one run dir; nothing is read or created by building one."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    recipe = property(lambda self: self.path / RECIPE)
    metrics = property(lambda self: self.path / METRICS)
    adapter_stats = property(lambda self: self.path / ADAPTER_STATS)
    summary = property(lambda self: self.path / SUMMARY)
    adapter = property(lambda self: self.path / ADAPTER)
    best_adapter = property(lambda self: self.path / BEST_ADAPTER)
    checkpoints = property(lambda self: self.path / CHECKPOINTS)
    calibration = property(lambda self: self.path / CALIBRATION)
    analysis = property(lambda self: self.path / ANALYSIS)

    def predictions(self, at_start: bool = False) -> Path:
        return self.path / (PREDICTIONS_AT_START if at_start else PREDICTIONS)

    def is_run(self) -> bool:
        return self.recipe.is_file()

    def read_recipe(self) -> Recipe:
        if not self.is_run():
            raise LrftError(f"{self.path}: not an lrft run dir (no {RECIPE}); give the dir `lrft train` wrote")
        return validate(parse_yaml(self.recipe.read_text(encoding="utf-8"), str(self.recipe)), source=str(self.recipe))

    def adapter_config(self) -> dict:
        """adapter/adapter_config.json, read without loading any model."""
        self.read_recipe()  # a clear error for a dir that is not a run dir
        path = self.adapter / CONFIG_FILE
        if not path.is_file():
            raise LrftError(f"{self.path}: no trained adapter in {self.adapter}; the run has not finished "
                            f"(rerun `lrft train` on its recipe to resume it)")
        return read_json(path, "adapter config")


def load_run(run_dir: Path, *, best: bool = False, force: bool = False) -> Opened:
    """The run's base model with its trained adapter (and head) loaded, ready to evaluate or merge."""
    run = RunDir(run_dir)
    recipe = run.read_recipe()
    adapter_dir = run.best_adapter if best else run.adapter
    if not (adapter_dir / CONFIG_FILE).is_file():
        raise LrftError(f"{run.path}: no trained adapter in {adapter_dir}; the run has not finished "
                        f"(rerun `lrft train` on its recipe to resume it)")
    state, config = load_adapter(adapter_dir)
    if config.get("method") != recipe.adapter.method:
        raise LrftError(f"{adapter_dir}: adapter of method {config.get('method')!r} but the run's recipe says "
                        f"{recipe.adapter.method!r}; the run dir was mixed with another run's files")
    recipe.adapter.target_modules = config["target_modules"]
    base = load_base(recipe.model, get_task(config["task"]), config.get("label_names"), recipe.adapter.target_modules,
                     recipe.adapter.params.rank)
    check_fingerprint(config, base, adapter_dir, force)
    a = adapt(base, recipe, saved_meta=config.get("meta"))
    load_saved_state(a.model, state, str(adapter_dir))
    a.model.eval()
    return Opened(a, config, recipe.model, recipe.data, run.path)


def open_adapted(target: Path, *, task: str | None = None, base: str | None = None, force: bool = False,
                 best: bool = False) -> Opened | None:
    """An lrft run dir or a PEFT LoRA dir, opened on its base model; None for anything else (a model)."""
    target = Path(target)
    if RunDir(target).is_run():
        opened = load_run(target, best=best, force=force)
        if task and task != opened.adapted.task.name:
            raise LrftError(f"--task: the run was trained on {opened.adapted.task.name}, not {task}; leave out --task to "
                            f"use the run's task")
        return opened
    if is_peft_dir(target):
        return load_peft(target, task, base, force)
    return None

