"""`lrft sweep`: search recipe settings (optuna) for the smallest adapter that still works.

`spec` (what a sweep is: its base recipe, search space, objective, seeds, budget, pruner; its points'
names, run dirs and `lrft train` commands) → `storage` (where the study lives, by URL) → `study` (the
optuna study worked by any number of workers: training trials, pruning, retrying a dead worker's,
plans) → `results` (what the run dirs hold, and what the storage recorded) → `report` (the table,
the Pareto plot, the smallest adapter within a tolerance of the best; text, JSON, Markdown). This
module is what the CLI calls.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from lrft import console
from lrft.atomic_files import disk_failures
from lrft.errors import LrftError
from lrft.signals import handling
from lrft.sweep.results import collect, top_points
from lrft.sweep.spec import Sweep, load_sweep
from lrft.sweep.storage import STORAGE_ENV, masked
from lrft.sweep.study import planned_points, recorded, work


def check_flags(*, plan: bool, report: bool, markdown: bool, json_out: bool, workers: int) -> None:
    """The flag combinations `lrft sweep` refuses, each in one line."""
    if plan and (report or markdown or json_out or workers > 1):
        raise LrftError("--plan prints commands only; drop --report, --markdown, --json and --workers with it")
    if report and workers > 1:
        raise LrftError("--workers trains a sweep; drop it with --report")
    if markdown and json_out:
        raise LrftError("--markdown and --json: choose one")


def load_sweeps(paths: list[Path], storage: str | None = None) -> list[Sweep]:
    """Every spec loaded and checked before anything runs (their study in `storage`, a URL, if given).
    Sweeps given together are reported together, so they share a task and a metric; no two share a
    sweep dir."""
    sweeps = [load_sweep(p, storage) for p in paths]
    first, seen = sweeps[0], {}
    for sweep in sweeps:
        other = seen.setdefault(sweep.dir.resolve(), sweep)
        if other is not sweep:
            raise LrftError(
                f"{sweep.path}: writes {sweep.dir} as {other.path} does; give one of them another name (name: ...)"
            )
        if (sweep.task.name, sweep.metric, sweep.direction) != (first.task.name, first.metric, first.direction):
            raise LrftError(
                f"{sweep.path}: sweeps given together are reported together, on one metric and task; "
                f"{first.name} is {first.metric} ({first.direction}) on {first.task.name}, {sweep.name} is "
                f"{sweep.metric} ({sweep.direction}) on {sweep.task.name}: give them in separate commands"
            )
    return sweeps


def run_sweeps(sweeps: list[Sweep]) -> None:
    """This process works through each sweep in turn (other processes may work on the same ones). A disk
    that fails under a local storage (SQLite: "database or disk is full") is a DiskError as a run's is:
    the trial is queued again (or, if the storage could not record that, found by its stale heartbeat)
    and the rerun resumes its run."""
    for sweep in sweeps:
        where = sweep.local_storage.name if sweep.local_storage else masked(sweep.storage)
        with disk_failures(sweep.dir, f"{where} (the sweep's storage)"):
            work(sweep)


def run_workers(paths: list[Path], workers: int, storage: str | None) -> int:
    """`workers` processes of `lrft sweep PATHS` on the same storages, each with its share of the cores;
    a stop signal is passed on to each. The exit code: the first worker's that failed, else 0."""
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    if storage:  # through the environment: a command line with a password shows in `ps`
        env[STORAGE_ENV] = storage
    cmd = [sys.executable, "-m", "lrft", "sweep", *map(str, paths)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL) for _ in range(workers)]

    def pass_on(signum, frame):
        for proc in procs:
            proc.send_signal(signum)

    with handling((signal.SIGTERM, signal.SIGUSR1), pass_on):
        codes = [proc.wait() for proc in procs]
    console.log(f"{workers} workers done: exit codes {codes}")
    return next((c for c in codes if c != 0), 0)


def plan_commands(sweeps: list[Sweep]) -> list[str]:
    """One `lrft train` command per run: each planned point × seed, then (once the search's runs are all
    done) the confirmation runs of the best points."""
    commands = []
    for sweep in sweeps:
        points = planned_points(sweep)
        commands += [sweep.job_command(p, seed) for p in points for seed in sweep.seeds]
        confirm = sweep.spec.confirm
        if confirm is None:
            continue
        failed, stored = recorded(sweep)
        results = {r.point.name: r for r in collect(sweep, stored)}
        settled = set(failed) | {n for n, r in results.items() if r.searched(sweep) or r.pruned()}
        if all(p.name in settled for p in points):
            best = top_points(sweep, list(results.values()), confirm.top)
            commands += [sweep.job_command(p, seed) for p in best for seed in confirm.seeds]
        else:
            console.log(
                f"sweep {sweep.name}: once these runs are done, --plan again adds the best {confirm.top} "
                f"point(s) with seeds {', '.join(map(str, confirm.seeds))}"
            )
    return commands
