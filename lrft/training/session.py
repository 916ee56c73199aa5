"""The run dir's lifecycle around a training run: what happens to it before and between the steps.

Whether lrft may write it at all (`check_run_dir`), its lock, held by the main process while every
process learns whether it got it (`sole_writer`); whether it holds this run finished already
(`finished_summary`), or a checkpoint of it to resume (`resume_point`), compared by the recipe it was
trained with (`saved_recipe`, `recipe_diff`); a restart's deletion of the old run; and its logs cut
back to what a checkpoint saw (`rewind_logs`). The layout itself is lrft.run_layout's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from lrft import console
from lrft.atomic_files import check_writable, read_json
from lrft.checkpoint import CONFIG_FILE, list_checkpoints
from lrft.errors import LrftError
from lrft.guard import check_restartable, remove_run_dir, run_dir_holding
from lrft.open_runs import read_run_recipe
from lrft.parallel import Parallel
from lrft.recipe import Recipe
from lrft.run_layout import LAYOUT, RunDir
from lrft.run_lock import Busy, writer_lock
from lrft.training.state import Progress

# Recipe keys that may change between a run and its resumption without making it another run; those of
# them that leave the length of training alone leave a finished run finished.
RESUMABLE_CHANGES = {
    "train.log_every",
    "train.eval_every",
    "train.save_every",
    "train.keep_last",
    "train.epochs",
    "train.max_steps",
    "train.device",
    "train.save_every_minutes",
    "train.report_to",
    "train.generation_batch_size",  # how evaluation's generations are batched, not what is trained
}
LENGTH_KEYS = {"train.epochs", "train.max_steps"}


def check_run_dir(path: Path, restart: bool) -> None:
    """Refuse, before anything loads, a run dir lrft cannot write, one inside another run, or (with
    --restart) one it must not delete."""
    check_writable(path, "output.dir")
    around = run_dir_holding(path)
    if around is not None:
        raise LrftError(
            f"output.dir: {path.parent} is inside the lrft run dir {around}; a run dir never goes "
            f"inside another run, so set output.dir to a dir of its own (e.g. {around.parent})"
        )
    if restart:
        check_restartable(path, LAYOUT)


@contextmanager
def sole_writer(path: Path, parallel: Parallel) -> Iterator[None]:
    """The run dir's lock, held by the main process; every process learns whether it got it (so every
    process enters this, and all of them raise Busy together)."""
    with ExitStack() as stack:
        problem = None
        if parallel.main:
            try:
                stack.enter_context(writer_lock(path))
            except Busy as e:
                problem = str(e)
        problem = parallel.broadcast(problem)
        if problem is not None:
            raise Busy(problem)
        yield


def finished_summary(run: RunDir, recipe: Recipe, restart: bool) -> dict | None:
    """The summary of the run if it already finished with this recipe (then nothing is done)."""
    if restart or not (run.is_run() and run.summary.is_file() and (run.adapter / CONFIG_FILE).is_file()):
        return None
    changed = set(recipe_diff(saved_recipe(run).model_dump(mode="json"), recipe.model_dump(mode="json")))
    if changed - (RESUMABLE_CHANGES - LENGTH_KEYS):
        return None  # longer training continues it; another recipe is refused by resume_point
    summary = complete_summary(run.summary)
    if summary is None:
        console.warn(
            f"{run.summary} is damaged; the run is finished again from its last checkpoint, which writes it anew"
        )
        return None
    final = ", ".join(f"{k} {v:.4f}" for k, v in summary["final"].items())
    console.log(
        f"{run.path} is complete ({summary.get('steps')} steps; {final}); nothing to do. `--restart` "
        f"trains it again from scratch, a larger train.epochs or train.max_steps continues it"
    )
    return summary


def resume_point(run: RunDir, recipe: Recipe) -> Path | None:
    """The newest checkpoint of the run dir, if the recipe is the run's own. A run dir of another recipe
    is refused, with or without checkpoints: starting afresh in it would overwrite that run."""
    ckpts = list_checkpoints(run.checkpoints)
    if run.is_run():
        changed = [
            k
            for k in recipe_diff(saved_recipe(run).model_dump(mode="json"), recipe.model_dump(mode="json"))
            if k not in RESUMABLE_CHANGES
        ]
        if changed:
            what = "a checkpoint of another recipe" if ckpts else "the run of another recipe"
            raise LrftError(
                f"{run.path}: holds {what} ({', '.join(changed[:4])} changed); rerun with --restart to "
                f"start over, or set name=... for a new run"
            )
    return ckpts[-1] if ckpts else None


def saved_recipe(run: RunDir) -> Recipe:
    """The recipe a run dir holds; a damaged one is refused with what to do about it."""
    try:
        return read_run_recipe(run.path)
    except LrftError as e:
        raise LrftError(
            f"{e}; the run dir's recipe is damaged: rerun with --restart to start over, or set name=... for a new run"
        ) from None


def complete_summary(path: Path) -> dict | None:
    """A run's summary.json if it holds what a finished run writes (the final metrics and the time, as
    numbers); None for a damaged one."""
    try:
        summary = read_json(path, "summary")
    except LrftError:
        return None
    final = summary.get("final")
    numbers = isinstance(final, dict) and all(isinstance(v, (int, float)) for v in final.values())
    return summary if numbers and isinstance(summary.get("train_seconds"), (int, float)) else None


def recipe_diff(a, b, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two recipe dumps."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += recipe_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def remove_for_restart(run: RunDir) -> None:
    """--restart: the old run goes (only what lrft writes in a run dir; check_run_dir allowed it)."""
    remove_run_dir(run.path, LAYOUT)


def log_sizes(run: RunDir) -> tuple[int, int]:
    """The lengths of metrics.jsonl and adapter_stats.jsonl, which a checkpoint records."""
    return file_size(run.metrics), file_size(run.adapter_stats)


def rewind_logs(run: RunDir, progress: Progress) -> None:
    """Drop what was logged after the checkpoint we resume from; it will be logged again."""
    truncate(run.metrics, progress.metrics_bytes)
    truncate(run.adapter_stats, progress.stats_bytes)


def file_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def truncate(path: Path, size: int) -> None:
    """The file cut to `size` bytes, if it is longer."""
    if path.exists() and path.stat().st_size > size:
        with open(path, "r+b") as f:
            f.truncate(size)
