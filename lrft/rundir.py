"""The run dir, a public contract (README "Run dir"): the one place that knows its layout, and opening
what `lrft eval`, `merge` and `analyze` work on: a run dir, or a PEFT LoRA adapter dir.

    <output.dir>/<name>/
      recipe.yaml            the resolved recipe
      metrics.jsonl          a line per logged step and per evaluation
      adapter_stats.jsonl    per module at step 0, each log step and epoch end: ‖ΔW‖_F (and α, ‖B‖_F for tlora)
      summary.json           best and final metrics, counts, times, peak memory
      adapter/ best_adapter/ adapter.safetensors + adapter_config.json
      checkpoints/           resumable checkpoints (lrft.checkpoint)
      calibration/           statistics and plan of methods that calibrate (lrft.calibrate)
      analysis/              `lrft analyze` output
      predictions.jsonl      generations of generation tasks (predictions_step0.jsonl before training)
      pruned.json            `lrft sweep` stopped the run early: the epoch, the metric, the trial
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lrft import console

from lrft.adapt import Opened, adapt, check_fingerprint, load_base
from lrft.checkpoint import CONFIG_FILE, load_adapter, read_adapter_config
from lrft.data import DATA_DIR_ENV, HUB_SOURCE, get_task, local_source
from lrft.errors import LrftError
from lrft.files import read_json
from lrft.guard import RUN_MARKER
from lrft.inject import load_saved_state
from lrft.models import ALIASES, looks_local
from lrft.peft_format import is_peft_dir, load_peft
from lrft.recipe import DataConfig, Recipe, read_recipe_mapping, validate

RECIPE = RUN_MARKER  # the file that makes a dir a run dir: lrft.guard never lets a command replace one
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
TRACKERS = "trackers"
PRUNED = "pruned.json"
# Every entry a run dir may hold: `train --restart` deletes a run dir only if it holds nothing else.
LAYOUT = frozenset({RECIPE, METRICS, ADAPTER_STATS, SUMMARY, ADAPTER, BEST_ADAPTER, CHECKPOINTS, CALIBRATION, ANALYSIS,
                    PREDICTIONS, PREDICTIONS_AT_START, TRACKERS, PRUNED})
MERGE_REPORT = "merge_report.json"  # in a merged model dir: the parity numbers and where their data came from


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
    trackers = property(lambda self: self.path / TRACKERS)
    pruned = property(lambda self: self.path / PRUNED)

    def predictions(self, at_start: bool = False) -> Path:
        return self.path / (PREDICTIONS_AT_START if at_start else PREDICTIONS)

    def is_run(self) -> bool:
        return self.recipe.is_file()

    def read_recipe(self) -> Recipe:
        if not self.path.exists():
            raise LrftError(f"{self.path}: no such directory; give the run dir `lrft train` wrote")
        if not self.is_run():
            raise LrftError(f"{self.path}: not an lrft run dir (no {RECIPE}); give the dir `lrft train` wrote")
        return validate(read_recipe_mapping(self.recipe), source=str(self.recipe))

    def adapter_config(self) -> dict:
        """adapter/adapter_config.json, read without loading any model."""
        self.read_recipe()  # a clear error for a dir that is not a run dir
        if not (self.adapter / CONFIG_FILE).is_file():
            raise LrftError(f"{self.path}: no trained adapter in {self.adapter}; the run has not finished "
                            f"(rerun `lrft train` on its recipe to resume it)")
        return read_adapter_config(self.adapter)


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


def open_adapted(name: str | Path, *, task: str | None = None, base: str | None = None, force: bool = False,
                 best: bool = False) -> Opened | None:
    """An lrft run dir or a PEFT LoRA dir, opened on its base model; None for anything else (a model).

    A name meant as a path (models.looks_local) that is not there is refused at once, never tried as a
    hub id."""
    target = Path(name).expanduser()
    if not target.exists() and looks_local(str(name)):
        raise LrftError(f"{name}: no such directory; give a run dir of `lrft train`, a PEFT adapter dir, a model "
                        f"dir, an alias ({', '.join(ALIASES)}) or a hub id")
    if RunDir(target).is_run():
        opened = load_run(target, best=best, force=force)
        if task and task != opened.adapted.task.name:
            raise LrftError(f"--task: the run was trained on {opened.adapted.task.name}, not {task}; leave out --task to "
                            f"use the run's task")
        return opened
    if is_peft_dir(target):
        return load_peft(target, task, base, force)
    return None


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
        console.warn(f"{opened.config.get('task')} was trained on the files in {recorded}, which are gone; "
                     f"reading them from {elsewhere} (--data-path names another dir)")
    return data


def merged_data_source(model_dir: Path, task: str) -> str | None:
    """The local data dir a merged model dir's parity check read, if it was for `task` and is still there."""
    path = Path(model_dir) / MERGE_REPORT
    if not path.is_file():
        return None
    report = read_json(path, "merge report")
    return local_source(report.get("data_source")) if report.get("task") == task else None


# ------------------------------------------------------------------------------- one writer per dir

class Busy(LrftError):
    """Another live process holds the lock of the dir (it is training or writing it)."""


@contextmanager
def writer_lock(directory: Path):
    """Hold the lock of `directory` (a run dir, or a dir a command writes) while the block runs.

    The lock is a `filelock.FileLock` beside the dir (`.<name>.lock`: the dir itself may be deleted and
    made anew while it is held), with the holder's host, pid and start time beside it. A live holder
    makes this refuse with one line; a holder that is gone (killed before it could let go) is taken
    over with a warning.
    """
    from filelock import FileLock, Timeout

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(directory.parent / f".{directory.name}.lock")
    info_path = directory.parent / f".{directory.name}.lock.json"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = _holder(info_path)
        if not _gone(holder):
            raise Busy(f"{directory}: {_describe(holder)} is writing it; wait until it is done (or stop it), "
                       f"or write elsewhere") from None
        Path(lock.lock_file).unlink(missing_ok=True)  # a lock only a file says is held (a soft lock)
        lock.acquire(timeout=0)
    previous = _holder(info_path)
    if previous and previous.get("pid") != os.getpid():
        console.warn(f"{directory}: taking over from {_describe(previous)}, which is gone without letting go")
    info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    info_path.write_text(json.dumps(info), encoding="utf-8")
    try:
        yield
    finally:
        info_path.unlink(missing_ok=True)
        # Removed while still held, so no lock file outlives the command (a refused command leaves no new
        # file): whoever opens the name afterwards gets a fresh file, and this writer is done by now.
        Path(lock.lock_file).unlink(missing_ok=True)
        lock.release()


def _holder(info_path: Path) -> dict:
    try:
        return json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    return f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"


def _gone(holder: dict) -> bool:
    """Whether the holder is known dead: only a process of this host can be checked."""
    if not holder or holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, KeyError):
        return False
    return False
