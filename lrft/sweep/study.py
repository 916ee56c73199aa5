"""The search: an optuna study (lrft.sweep.storage says where it lives) worked through by any number of
`lrft sweep` processes on any machines, each trial a point trained once per seed through the ordinary
`lrft train` path, in this process, into run dirs named by the point (on a filesystem every worker
sees, as on clusters).

- Workers: `Study.optimize` asks, trains and tells. While a trial trains, its worker's heartbeat
  thread beats in the storage; a trial whose beat is older than the grace period is marked FAILED by
  the next worker that asks, and queued again with its params and reported epochs
  (RetryHeartbeatStaleTrialCallback), so that worker resumes its run from the checkpoint. A trial
  stopped by a signal or a full disk is queued again at once, the same way. The point's lock
  (lrft.run_lock) is held while its runs train, so two trials of one point never train it at once.
- Budget: a trial asked past budget.trials (two workers asked at once) is left untrained; trials that
  were retried count once. A worker with nothing left to ask waits for the trials others still run
  (any of them may be a dead worker's, to retry here), then confirms the best points.
- Pruning: each epoch-end evaluation of a point's first seed is reported at step = epoch; when the
  pruner says so the run stops there (its checkpoint kept), `pruned.json` marks its run dir, and the
  trial is PRUNED for good.
- Determinism: a grid's trial n is GridSampler's point n; trial n of TPE is seeded with the spec's
  seed plus n, so a resumed sweep asks what an uninterrupted one would.
- Reports: each run's result (lrft.sweep.results.RunResult) is stored with the trial (confirmation
  runs: with the study), so a report needs the storage alone.
"""

from __future__ import annotations

import statistics
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from functools import partial
from pathlib import Path

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from lrft import console
from lrft.atomic_files import atomic_write_json, read_jsonl
from lrft.errors import DiskError, LrftError
from lrft.recipe import Recipe
from lrft.run_layout import RunDir
from lrft.run_lock import Busy, writer_lock
from lrft.sweep.results import RunResult, collect, read_run, top_points
from lrft.sweep.spec import Point, Sweep, three_digits
from lrft.sweep.storage import DEFAULT_FILE, masked, open_storage, retry_stale
from lrft.training import Diverged, Progress, Stopped, train
from lrft.training.session import recipe_diff

POINT = "point"  # the trial's user attribute naming its point
FAILED = "failed"  # ... saying why it failed
RUNS = "runs"  # ... holding each seed's RunResult (the study's "confirm <point>" attribute: confirmation runs')
OVER_BUDGET = "over budget"  # ... marking a trial asked past the budget, left untrained
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats, retries


class Pruned(optuna.TrialPruned):
    """The pruner stopped a run; `record` is what pruned.json says."""

    def __init__(self, record: dict):
        super().__init__(f"pruned at epoch {record['epoch']}")
        self.record = record


class OverBudget(Exception):
    """A trial asked once the budget was used up (by two workers at once): left untrained."""


# ------------------------------------------------------------------------------------------- study


def open_study(sweep: Sweep, create: bool = True) -> optuna.Study | None:
    """The sweep's study (created on first use); None without one when not `create`. A study begun with
    another spec or base recipe is refused, naming what changed."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # lrft says what happens, once
    local = sweep.local_storage
    if not create and local is not None and not local.is_file():
        return None  # a report reads no storage into being
    if local == sweep.dir.resolve() / DEFAULT_FILE:
        sweep.dir.mkdir(parents=True, exist_ok=True)  # a given path's directory must exist (a typo stays one)
    storage = open_storage(sweep.storage, sweep.spec.heartbeat.interval, sweep.spec.heartbeat.grace)
    if not create and sweep.name not in {s.study_name for s in storage.get_all_studies()}:
        return None
    study = optuna.create_study(
        study_name=sweep.name,
        storage=storage,
        load_if_exists=True,
        direction="maximize" if sweep.direction == "max" else "minimize",
        sampler=make_sampler(sweep),
        pruner=make_pruner(sweep),
    )
    stored = study.user_attrs.get("identity")
    if stored is None:
        study.set_user_attr("identity", sweep.identity())
    elif sweep.identity(stored) != sweep.identity():
        changed = recipe_diff(sweep.identity(stored), sweep.identity())
        raise LrftError(
            f"{sweep.path}: the sweep {sweep.name} in {masked(sweep.storage)} was begun with another spec or base "
            f"recipe ({', '.join(changed[:4])} changed); restore them, or name this sweep anew (name: ...)"
        )
    return study


def make_sampler(sweep: Sweep) -> optuna.samplers.BaseSampler:
    if sweep.sampler == "grid":
        search_space = {k: d.labels() for k, d in sweep.spec.search.items()}
        return optuna.samplers.GridSampler(search_space, seed=sweep.spec.sampler.seed)
    return TrialSeededTPE(sweep.spec.sampler.seed, sweep.spec.sampler.startup_trials)


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """optuna's TPE (constant liar: the trials others run count as pending), seeded for each trial with
    the spec's seed plus the trial's number: a resumed sweep asks what an uninterrupted one would, and
    two workers asking at once draw apart."""

    def __init__(self, seed: int, startup_trials: int):
        self.seed, self.startup_trials = seed, startup_trials
        self.tpe = self.seeded(seed)

    def seeded(self, seed: int) -> optuna.samplers.TPESampler:
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=self.startup_trials)

    def before_trial(self, study, trial):
        self.tpe = self.seeded(self.seed + trial.number)
        self.tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self.tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values):
        self.tpe.after_trial(study, trial, state, values)


def make_pruner(sweep: Sweep) -> optuna.pruners.BasePruner:
    p = sweep.spec.pruner
    if p.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_epochs)
    if p.type == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_epochs, reduction_factor=p.reduction_factor)
    return optuna.pruners.NopPruner()


def suggest(sweep: Sweep, trial: optuna.Trial) -> Point:
    """The trial's point: the sampler's values (or those it already has), sampled floats to 3 digits."""
    settings = {}
    for key, dim in sweep.spec.search.items():
        if dim.values is not None:
            settings[key] = trial.suggest_categorical(key, dim.labels())
        elif dim.integer:
            settings[key] = trial.suggest_int(key, dim.low, dim.high, step=dim.step or 1, log=dim.log)
        else:
            settings[key] = trial.suggest_float(key, dim.low, dim.high, step=dim.step, log=dim.log)
    return point_of(sweep, settings)


def point_of(sweep: Sweep, params: dict) -> Point:
    """The point of a trial's params (a grid's value labels, a range's sampled numbers)."""
    settings = {}
    for key, dim in sweep.spec.search.items():
        value = params[key]
        if dim.values is not None:
            settings[key] = dim.values[dim.labels().index(value)]
        else:
            settings[key] = value if dim.integer else three_digits(value)
    return sweep.point(settings)


def grid_order(sweep: Sweep) -> list[Point]:
    """The grid's points in the order the sweep tries them (trial number i gets GridSampler's point i)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(sampler=make_sampler(sweep))  # in memory: only the order is wanted
    return [suggest(sweep, study.ask()) for _ in range(min(sweep.max_trials, len(sweep.grid_points())))]


# ------------------------------------------------------------------------------------------ trials


def frozen(study: optuna.Study, trial: optuna.Trial) -> FrozenTrial:
    """The trial as the storage holds it now."""
    return next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials of the search: each retried trial once (its last retry), none asked past the budget."""
    retried = {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}
    return [t for t in trials if t.number not in retried and OVER_BUDGET not in t.user_attrs]


def search_done(sweep: Sweep, study: optuna.Study) -> str | None:
    """Why no new trial should be asked for, or None."""
    search = counted(study.get_trials(deepcopy=False))
    if sweep.max_trials is not None and len(search) >= sweep.max_trials:
        return f"{len(search)} trials, the budget"
    if sweep.finite and len({t.user_attrs.get(POINT) for t in search} - {None}) >= len(sweep.grid_points()):
        return "every point of the search space has a trial"
    return None


def recorded(sweep: Sweep) -> tuple[dict[str, str], dict[str, tuple[Point, RunResult]]]:
    """What the storage says, read once: why each failed point failed, and every run it recorded (none
    of either without a storage)."""
    study = open_study(sweep, create=False)
    return ({}, {}) if study is None else (failures(study), stored_results(sweep, study))


def failures(study: optuna.Study) -> dict[str, str]:
    """Point → why its trial failed."""
    return {
        t.user_attrs[POINT]: t.user_attrs.get(FAILED, "its worker stopped beating (killed?) every time it was tried")
        for t in counted(study.get_trials(deepcopy=False))
        if t.state == TrialState.FAIL and POINT in t.user_attrs
    }


def stored_results(sweep: Sweep, study: optuna.Study) -> dict[str, tuple[Point, RunResult]]:
    """Run name → (point, result) of every run the storage recorded, wherever it trained."""
    out = {}
    for t in counted(study.get_trials(deepcopy=False)):
        if RUNS in t.user_attrs and set(t.params) == set(sweep.spec.search):
            point = point_of(sweep, t.params)
            for result in t.user_attrs[RUNS].values():
                out[sweep.run_name(point, result["seed"])] = (point, stored_result(result))
    for key, runs in study.user_attrs.items():
        if key.startswith("confirm "):
            point = sweep.point(runs["settings"])
            for result in runs["results"].values():
                out[sweep.run_name(point, result["seed"])] = (point, stored_result(result))
    return out


def result_attr(sweep: Sweep, run: RunDir, seed: int) -> dict:
    return {**asdict(read_run(sweep, run, seed)), "path": str(run.path)}


def stored_result(result: dict) -> RunResult:
    return RunResult(**{**result, "path": Path(result["path"])})


# ------------------------------------------------------------------------------------- training


class EpochReporter:
    """Reports the epoch-end evaluations of a trial's first run to optuna (step = epoch) and stops the
    run when the pruner says so, but at its last epoch (nothing is left to save then); an epoch
    already in the storage (a resumed run, a retried trial) is not reported twice."""

    def __init__(self, sweep: Sweep, study: optuna.Study, trial: optuna.Trial, recipe: Recipe):
        self.sweep, self.trial = sweep, trial
        self.last_epoch = recipe.train.epochs if recipe.train.max_steps is None else None
        self.reported = set(frozen(study, trial).intermediate_values)

    def __call__(self, record: dict, progress: Progress) -> None:
        at = epoch_value(record, self.sweep.metric)
        if at is None:
            return
        self.report(*at)
        if at[0] != self.last_epoch and self.trial.should_prune():
            raise Pruned(
                {
                    "sweep": self.sweep.name,
                    "trial": self.trial.number,
                    "epoch": at[0],
                    "step": record["step"],
                    "metric": self.sweep.metric,
                    "value": at[1],
                    "train_seconds": round(progress.seconds.get("training", 0.0), 2),
                }
            )

    def report(self, epoch: int, value: float) -> None:
        if epoch not in self.reported:
            self.trial.report(value, epoch)
            self.reported.add(epoch)

    def catch_up(self, run: RunDir) -> None:
        """Report what a run trained elsewhere evaluated (the pruner compares other trials with it)."""
        for record in read_jsonl(run.metrics):
            if (at := epoch_value(record, self.sweep.metric)) is not None:
                self.report(*at)


def epoch_value(record: dict, metric: str) -> tuple[int, float] | None:
    """(epoch, metric) of an evaluation at the end of an epoch, else None."""
    epoch = record.get("epoch")
    if record.get("type") != "eval" or metric not in record or epoch is None or epoch < 1 or epoch != int(epoch):
        return None
    return int(epoch), record[metric]


@contextmanager
def holding(sweep: Sweep, point: Point, wait_s: float):
    """The point's lock, waited for while another worker holds it (it trains the same point: once it is
    done, its runs are complete here too)."""
    with ExitStack() as lock:
        while True:
            try:
                lock.enter_context(writer_lock(sweep.dir / point.name))
                break
            except Busy:
                time.sleep(wait_s)
        yield


def run_trial(sweep: Sweep, study: optuna.Study, trial: optuna.Trial) -> float:
    """The objective: train the trial's point once per seed; the mean of the metric, or Pruned / Diverged."""
    if len([t for t in counted(study.get_trials(deepcopy=False)) if t.number < trial.number]) >= (
        sweep.max_trials or float("inf")
    ):
        trial.set_user_attr(OVER_BUDGET, True)
        study.stop()
        raise OverBudget()
    point = suggest(sweep, trial)
    trial.set_user_attr(POINT, point.name)
    if (first := RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen(study, trial))) is not None:
        console.log(f"trial {trial.number} ({point.name}): trial {first} again (its worker stopped), resuming its runs")
    with holding(sweep, point, sweep.spec.heartbeat.interval):
        try:
            return train_point(sweep, study, trial, point)
        except (Stopped, DiskError, KeyboardInterrupt):
            retry_stale()(study, frozen(study, trial))  # the next ask (any worker's) resumes it
            raise


def train_point(sweep: Sweep, study: optuna.Study, trial: optuna.Trial, point: Point) -> float:
    results, finals = {}, []
    for index, seed in enumerate(sweep.seeds):
        run = RunDir(sweep.run_dir(point, seed))
        if run.pruned.is_file() and not run.summary.is_file():  # pruned by a worker killed before it told optuna
            raise optuna.TrialPruned(f"pruned at epoch {read_run(sweep, run, seed).epoch}")
        recipe = sweep.recipe(point, seed)
        reporter = EpochReporter(sweep, study, trial, recipe) if index == 0 else None
        console.log(f"trial {trial.number} ({point.name}): training seed {seed} in {run.path}")
        try:
            summary = train_waiting(recipe, reporter, sweep.spec.heartbeat.interval)
        except Pruned as pruned:
            atomic_write_json(run.pruned, pruned.record)
            trial.set_user_attr(RUNS, {**results, str(seed): result_attr(sweep, run, seed)})
            console.log(
                f"trial {trial.number} ({point.name}): pruned at epoch {pruned.record['epoch']} "
                f"({sweep.metric} {pruned.record['value']:.4f})"
            )
            raise
        except Diverged as e:
            trial.set_user_attr(FAILED, str(e))
            console.warn(f"trial {trial.number} ({point.name}): failed: {e}")
            raise
        if reporter is not None:
            reporter.catch_up(run)
        finals.append(summary["final"][sweep.metric])
        results[str(seed)] = result_attr(sweep, run, seed)
        trial.set_user_attr(RUNS, results)
    mean = statistics.mean(finals)
    console.log(
        f"trial {trial.number} ({point.name}): {sweep.metric} {mean:.4f} "
        f"(mean of {len(finals)} seed{'s' * (len(finals) > 1)})"
    )
    return mean


def train_waiting(recipe: Recipe, reporter, wait_s: float) -> dict:
    """`train`, waited for while an `lrft train` elsewhere (a --plan command) holds the run dir."""
    while True:
        try:
            return train(recipe, on_evaluate=reporter)
        except Busy as e:
            console.log(f"{e}; waiting for it")
            time.sleep(wait_s)


def confirm(sweep: Sweep, study: optuna.Study) -> None:
    """The best points trained again with the confirmation seeds, once no trial runs anywhere; their
    results stored with the study."""
    if sweep.spec.confirm is None:
        return
    if running := study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        console.log(
            f"sweep {sweep.name}: {len(running)} trial(s) still run; the best point is known once they "
            f"finish: rerun this command then to confirm it with seeds {sweep.spec.confirm.seeds}"
        )
        return
    for point in top_points(sweep, collect(sweep, stored_results(sweep, study)), sweep.spec.confirm.top):
        results = {}
        with holding(sweep, point, sweep.spec.heartbeat.interval):
            for seed in sweep.spec.confirm.seeds:
                console.log(f"confirm {point.name}: training seed {seed} in {sweep.run_dir(point, seed)}")
                try:
                    train_waiting(sweep.recipe(point, seed), None, sweep.spec.heartbeat.interval)
                except Diverged as e:
                    console.warn(f"confirm {point.name}: seed {seed} failed: {e}")
                results[str(seed)] = result_attr(sweep, RunDir(sweep.run_dir(point, seed)), seed)
        study.set_user_attr(f"confirm {point.name}", {"settings": point.settings, "results": results})


def work(sweep: Sweep) -> None:
    """One worker: ask and train trials until the search is done or the time budget is spent, wait for
    the trials other workers run (retrying a dead worker's), then confirm."""
    study = open_study(sweep)
    hb = sweep.spec.heartbeat
    console.log(
        f"sweep {sweep.name}: {sweep.sampler} sampler, {sweep.max_trials or 'unbounded'} trials × "
        f"{len(sweep.seeds)} seed(s), {sweep.metric} ({sweep.direction}), pruner {sweep.spec.pruner.type}; "
        f"runs in {sweep.dir}, study in {masked(sweep.storage)} (heartbeat {hb.interval} s, grace {hb.grace} s)"
    )

    def has_work() -> bool:  # a queued trial (a retry, a planned one) is asked whatever the budget says
        return search_done(sweep, study) is None or bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))

    def after_trial(study: optuna.Study, _: FrozenTrial) -> None:
        if not has_work():
            study.stop()

    minutes, started, waiting = sweep.spec.budget.minutes, time.monotonic(), False
    while True:
        left = None if minutes is None else 60 * minutes - (time.monotonic() - started)
        if left is not None and left <= 0:
            console.log(f"sweep {sweep.name}: the time budget ({minutes:g} min) is spent; no new trial")
            break
        if has_work():
            study.optimize(
                partial(run_trial, sweep, study), timeout=left, catch=(Diverged, OverBudget), callbacks=[after_trial]
            )
            waiting = False
            continue
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            console.log(f"sweep {sweep.name}: no new trial ({search_done(sweep, study)})")
            break
        if not waiting:
            console.log(
                f"sweep {sweep.name}: waiting for {len(running)} trial(s) other workers run (one whose worker "
                f"is gone is retried here once its heartbeat is {hb.grace} s old)"
            )
            waiting = True
        time.sleep(hb.interval)
        fail_stale_trials(study)
    confirm(sweep, study)


# ---------------------------------------------------------------------------------------- plans


def planned_points(sweep: Sweep) -> list[Point]:
    """The points --plan prints: a grid's, in the order the sweep tries them; a sampled sweep's trials,
    the next suggestions (up to budget.trials) asked now, without results, and queued in the storage as
    a dead worker's trial is (told FAILED, queued again), so a later `lrft sweep` asks them first (or
    finds their runs done) and the next --plan continues after them."""
    if sweep.sampler == "grid":
        return grid_order(sweep)
    if sweep.max_trials is None:
        raise LrftError(f"{sweep.path}: --plan of a tpe sweep needs budget.trials (how many suggestions to print)")
    study = open_study(sweep)
    asked = []  # all asked before any is queued: an ask takes a queued trial first
    while search_done(sweep, study) is None:
        with warnings.catch_warnings():  # that heartbeats beat only inside optimize: these trials train elsewhere
            warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
            trial = study.ask()
        trial.set_user_attr(POINT, suggest(sweep, trial).name)
        asked.append(trial)
    for trial in asked:
        retry_stale(max_retry=None)(study, frozen(study, trial))  # always queued, however often planned
        study.tell(trial, state=TrialState.FAIL)
    points = [
        point_of(sweep, t.params)
        for t in counted(study.get_trials(deepcopy=False))
        if FAILED not in t.user_attrs and set(t.params) == set(sweep.spec.search)
    ]
    return list({p.name: p for p in points}.values())
