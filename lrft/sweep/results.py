"""What a sweep's runs hold: each point's runs (one per seed), finished, pruned or not done, with the
objective metric, trainable parameters and train time, read from the run dirs here and, for runs
whose dirs are on another machine's disk, from what the storage recorded when they ended
(lrft.sweep.study.recorded). A sweep whose runs were trained anywhere (its `--plan` commands on
a cluster) reads like one trained here.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from lrft.atomic_files import read_json
from lrft.checkpoint import CONFIG_FILE
from lrft.config.overrides import dotted_get
from lrft.open_runs import read_run_recipe
from lrft.run_layout import RunDir
from lrft.sweep.spec import Point, Sweep

RUN_NAME = re.compile(r"^(?P<point>.+)_s(?P<seed>-?\d+)$")  # <point>_s<seed>, as Sweep.run_name writes it


@dataclass
class RunResult:
    seed: int
    path: Path
    status: str  # finished, pruned or incomplete
    value: float | None  # the objective metric: at the end of a finished run, at the epoch a pruned one stopped
    epoch: int | None  # a pruned run's last epoch
    trainable: int | None
    seconds: float | None


@dataclass
class PointResult:
    point: Point
    runs: list[RunResult]

    def finished(self, seeds: list[int] | None = None) -> list[RunResult]:
        return [r for r in self.runs if r.status == "finished" and (seeds is None or r.seed in seeds)]

    def pruned(self) -> RunResult | None:
        return next((r for r in self.runs if r.status == "pruned"), None)

    def searched(self, sweep: Sweep) -> bool:
        """Every seed of the search finished (the point has its objective value)."""
        return {r.seed for r in self.finished(sweep.seeds)} >= set(sweep.seeds)

    def search_value(self, sweep: Sweep) -> float:
        """The objective of the search: the mean over the search's seeds (confirmation seeds left out)."""
        return statistics.mean(r.value for r in self.finished(sweep.seeds))


def collect(sweep: Sweep, stored: dict[str, tuple[Point, RunResult]] | None = None) -> list[PointResult]:
    """The points that have run dirs in the sweep dir, grouped by the run name's point part, and those
    with runs only `stored` (run name → point, result) knows of."""
    listed = {p.name: p for p in sweep.grid_points()} if sweep.finite else {}
    points: dict[str, PointResult] = {}
    here = set()
    for path in sorted(sweep.dir.iterdir()) if sweep.dir.is_dir() else ():
        match, run = RUN_NAME.match(path.name), RunDir(path)
        if not (match and path.is_dir() and run.is_run()):
            continue
        recipe = read_run_recipe(run.path)
        name = match["point"]
        if name not in points:
            dump = recipe.model_dump(mode="json")
            point = listed.get(name) or Point(name, {k: dotted_get(dump, k) for k in sweep.spec.search})
            points[name] = PointResult(point, [])
        points[name].runs.append(read_run(sweep, run, recipe.seed))
        here.add(path.name)
    for run_name, (point, result) in sorted((stored or {}).items()):
        if run_name not in here:
            points.setdefault(point.name, PointResult(point, [])).runs.append(result)
    return list(points.values())


def read_run(sweep: Sweep, run: RunDir, seed: int) -> RunResult:
    if run.summary.is_file():
        summary = read_json(run.summary, "summary")
        return RunResult(
            seed,
            run.path,
            "finished",
            (summary.get("final") or {}).get(sweep.metric),
            None,
            summary.get("trainable_params"),
            summary.get("train_seconds"),
        )
    config = run.best_adapter / CONFIG_FILE  # written at the first evaluation: a count before the end
    trainable = read_json(config, "adapter config").get("trainable_params") if config.is_file() else None
    if run.pruned.is_file():
        pruned = read_json(run.pruned, "pruned record")
        return RunResult(
            seed, run.path, "pruned", pruned.get("value"), pruned.get("epoch"), trainable, pruned.get("train_seconds")
        )
    return RunResult(seed, run.path, "incomplete", None, None, trainable, None)


def top_points(sweep: Sweep, results: list[PointResult], n: int) -> list[Point]:
    """The n best points by the search's objective (ties: the first name), among those whose search is done."""
    done = [r for r in results if r.searched(sweep)]
    sign = -1 if sweep.direction == "max" else 1
    done.sort(key=lambda r: (sign * r.search_value(sweep), r.point.name))
    return [r.point for r in done[:n]]
