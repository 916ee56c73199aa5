"""The search: an optuna study in `<sweep dir>/sweep.db` (SQLite), worked through by one or more
`lrft sweep` processes, each trial a point trained once per seed through the ordinary `lrft train`
path (lrft.training), in this process, into run dirs named by the point.

- Claiming: one process at a time (a lock file in the sweep dir) first takes over a trial whose
  worker is gone (RUNNING in the storage, its point's lock free), else asks the sampler for a new
  one; the point's lock (lrft.run_lock.writer_lock) is held while its runs train, so no two workers
  ever train the same point, and a worker killed mid-trial leaves it to the next one, which resumes
  its run from its checkpoint (a run dir resumes by itself when trained again with the same recipe).
- Pruning: each epoch-end evaluation of a point's first seed is reported to optuna at step = epoch;
  when the pruner says so the run stops there (its checkpoint kept), `pruned.json` marks its run dir,
  and the trial is PRUNED for good.
- Determinism: a grid runs its points in the order optuna's GridSampler gives trial numbers; TPE is
  seeded with the spec's seed plus the number of trials so far, so a resumed sweep asks what an
  uninterrupted one would have.
"""

from __future__ import annotations

import statistics
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from lrft import console
from lrft.atomic_files import atomic_write_json, read_jsonl
from lrft.errors import LrftError
from lrft.recipe import Recipe
from lrft.run_layout import RunDir
from lrft.run_lock import Busy, writer_lock
from lrft.sweep.results import collect, top_points
from lrft.sweep.spec import Point, Sweep, three_digits
from lrft.training import Diverged, Progress, train
from lrft.training.session import recipe_diff

POINT = "point"  # the trial's user attribute naming its point
FAILED = "failed"  # ... saying why it failed
LOCK_WAIT_S = 600  # how long a process waits for another one to finish claiming a trial


class Pruned(Exception):
    """The pruner stopped a run; `record` is what pruned.json says."""

    def __init__(self, record: dict):
        super().__init__(f"pruned at epoch {record['epoch']}")
        self.record = record


@dataclass
class Claim:
    """A trial this process trains, its point, and the point's lock (held until `lock` is closed)."""

    trial: optuna.Trial
    point: Point
    lock: ExitStack


# ------------------------------------------------------------------------------------------- study


@contextmanager
def claiming(sweep: Sweep):
    """The sweep's claim lock: one process at a time creates the study or claims a trial."""
    from filelock import FileLock, Timeout

    sweep.dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(sweep.dir / ".claim.lock")
    try:
        lock.acquire(timeout=LOCK_WAIT_S)
    except Timeout:
        raise LrftError(
            f"{sweep.dir}: another lrft sweep process has held the claim lock for {LOCK_WAIT_S} s; "
            "is it stuck? stop it, or delete .claim.lock if no process uses this sweep"
        ) from None
    try:
        yield
    finally:
        lock.release()


def quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # lrft says what happens, once


def open_study(sweep: Sweep, create: bool = True) -> optuna.Study | None:
    """The sweep's study (created on first use); None without one when not `create`. A study begun with
    another spec or base recipe is refused, naming what changed."""
    from optuna.storages import RDBStorage

    quiet_optuna()
    if not create and not sweep.storage.is_file():
        return None
    with claiming(sweep):
        storage = RDBStorage(
            f"sqlite:///{sweep.storage.resolve()}", engine_kwargs={"connect_args": {"timeout": LOCK_WAIT_S}}
        )
        if not create and sweep.name not in {s.study_name for s in storage.get_all_studies()}:
            return None
        study = optuna.create_study(
            study_name=sweep.name,
            storage=storage,
            load_if_exists=True,
            direction="maximize" if sweep.direction == "max" else "minimize",
            sampler=make_sampler(sweep, 0),
            pruner=make_pruner(sweep),
        )
        stored = study.user_attrs.get("identity")
        if stored is None:
            study.set_user_attr("identity", sweep.identity())
        elif sweep.identity(stored) != sweep.identity():
            changed = recipe_diff(sweep.identity(stored), sweep.identity())
            raise LrftError(
                f"{sweep.path}: the sweep in {sweep.dir} was begun with another spec or base recipe "
                f"({', '.join(changed[:4])} changed); restore them, or name this sweep anew (name: ...)"
            )
    return study


class GridSampler(optuna.samplers.GridSampler):
    """optuna's GridSampler, which stops the study when its grid is done; `Study.stop` only works inside
    `Study.optimize` and this is an ask-and-tell loop, which stops by itself (`search_done`)."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def make_sampler(sweep: Sweep, trials_so_far: int) -> optuna.samplers.BaseSampler:
    if sweep.sampler == "grid":
        return GridSampler({k: d.labels() for k, d in sweep.spec.search.items()}, seed=sweep.spec.sampler.seed)
    return optuna.samplers.TPESampler(
        seed=sweep.spec.sampler.seed + trials_so_far,
        constant_liar=True,
        n_startup_trials=sweep.spec.sampler.startup_trials,
    )


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
            labels = dim.labels()
            settings[key] = dim.values[labels.index(trial.suggest_categorical(key, labels))]
        elif dim.integer:
            settings[key] = trial.suggest_int(key, dim.low, dim.high, step=dim.step or 1, log=dim.log)
        else:
            settings[key] = three_digits(trial.suggest_float(key, dim.low, dim.high, step=dim.step, log=dim.log))
    return sweep.point(settings)


def grid_order(sweep: Sweep) -> list[Point]:
    """The grid's points in the order the sweep tries them (trial number i gets GridSampler's point i)."""
    quiet_optuna()
    study = optuna.create_study(sampler=make_sampler(sweep, 0))  # in memory: only the order is wanted
    return [suggest(sweep, study.ask()) for _ in range(min(sweep.max_trials, len(sweep.grid_points())))]


def failures(sweep: Sweep) -> dict[str, str]:
    """Point → why its trial failed, from the storage if there is one."""
    study = open_study(sweep, create=False)
    if study is None:
        return {}
    return {
        t.user_attrs[POINT]: t.user_attrs.get(FAILED, "failed")
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if POINT in t.user_attrs
    }


# ------------------------------------------------------------------------------------ claiming


def search_done(sweep: Sweep, study: optuna.Study) -> str | None:
    """Why no new trial should be asked for, or None."""
    trials = study.get_trials(deepcopy=False)
    if sweep.max_trials is not None and len(trials) >= sweep.max_trials:
        return f"{len(trials)} trials, the budget"
    if sweep.finite and len({t.user_attrs.get(POINT) for t in trials} - {None}) >= len(sweep.grid_points()):
        return "every point of the search space has a trial"
    return None


def claim_next(sweep: Sweep, study: optuna.Study, skip: set[int]) -> Claim | None:
    """A trial for this process: one left by a worker that is gone, else a new one; None when the search
    has no more (`skip`: trials this process found busy elsewhere)."""
    with claiming(sweep):
        for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if frozen.number not in skip and (claim := adopt(sweep, study, frozen)):
                return claim
        while (reason := search_done(sweep, study)) is None:
            study.sampler = make_sampler(sweep, len(study.get_trials(deepcopy=False)))
            trial = study.ask()
            if claim := take_new(sweep, study, trial, suggest(sweep, trial)):
                return claim
    console.log(f"sweep {sweep.name}: no new trial ({reason})")
    return None


def adopt(sweep: Sweep, study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> Claim | None:
    """Take over a RUNNING trial whose point nobody holds (its worker is gone, or --plan recorded it)."""
    trial = optuna.Trial(study, frozen._trial_id)  # optuna has no public way to reopen a RUNNING trial
    point = suggest(sweep, trial)  # its own values (one cut short before sampling draws the rest now)
    lock = ExitStack()
    try:
        lock.enter_context(writer_lock(sweep.dir / point.name))
    except Busy:
        return None  # a live worker trains it
    if frozen.number not in {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}:
        lock.close()  # its worker finished it just now (a worker tells optuna before it lets go of the point)
        return None
    trial.set_user_attr(POINT, point.name)
    console.log(f"trial {trial.number} ({point.name}): taking it over (its worker is gone, or --plan recorded it)")
    return Claim(trial, point, lock)


def take_new(sweep: Sweep, study: optuna.Study, trial: optuna.Trial, point: Point) -> Claim | None:
    """The new trial's claim, None for a repeat of a point (it gets the earlier trial's outcome)."""
    if settle_repeat(study, trial, point):
        return None
    lock = ExitStack()
    try:
        lock.enter_context(writer_lock(sweep.dir / point.name))
    except Busy as e:
        trial.set_user_attr(FAILED, str(e))
        study.tell(trial, state=TrialState.FAIL)
        return None
    return Claim(trial, point, lock)


def settle_repeat(study: optuna.Study, trial: optuna.Trial, point: Point) -> bool:
    """Name the trial's point; a point an earlier trial has is not trained again: this trial gets that
    trial's value (or is pruned or failed with it; failed while it runs). True for a repeat."""
    earlier = next(
        (
            t
            for t in study.get_trials(deepcopy=False)
            if t.user_attrs.get(POINT) == point.name and t.number != trial.number
        ),
        None,
    )
    trial.set_user_attr(POINT, point.name)
    if earlier is None:
        return False
    if earlier.state == TrialState.COMPLETE:
        study.tell(trial, earlier.value)
    else:
        trial.set_user_attr(FAILED, f"the same point as trial {earlier.number}")
        study.tell(trial, state=TrialState.PRUNED if earlier.state == TrialState.PRUNED else TrialState.FAIL)
    console.log(f"trial {trial.number} ({point.name}): the point of trial {earlier.number}, not trained again")
    return True


# ------------------------------------------------------------------------------------- training


class EpochReporter:
    """Reports the epoch-end evaluations of a trial's first run to optuna (step = epoch) and stops the
    run when the pruner says so, but at its last epoch (nothing is left to save then); an epoch
    already in the storage (a resumed run) is not reported twice."""

    def __init__(self, sweep: Sweep, study: optuna.Study, trial: optuna.Trial, recipe: Recipe):
        self.sweep, self.trial = sweep, trial
        self.last_epoch = recipe.train.epochs if recipe.train.max_steps is None else None
        frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        self.reported = set(frozen.intermediate_values)

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


def run_trial(sweep: Sweep, study: optuna.Study, claim: Claim) -> None:
    """Train the point once per seed and tell optuna the mean of the metric, or that it was pruned or diverged."""
    trial, point = claim.trial, claim.point
    finals = []
    for index, seed in enumerate(sweep.seeds):
        run = RunDir(sweep.run_dir(point, seed))
        if run.pruned.is_file() and not run.summary.is_file():  # pruned by a worker killed before it told optuna
            study.tell(trial, state=TrialState.PRUNED)
            return
        recipe = sweep.recipe(point, seed)
        reporter = EpochReporter(sweep, study, trial, recipe) if index == 0 else None
        console.log(f"trial {trial.number} ({point.name}): training seed {seed} in {run.path}")
        try:
            summary = train(recipe, on_evaluate=reporter)
        except Pruned as pruned:
            atomic_write_json(run.pruned, pruned.record)
            study.tell(trial, state=TrialState.PRUNED)
            console.log(
                f"trial {trial.number} ({point.name}): pruned at epoch {pruned.record['epoch']} "
                f"({sweep.metric} {pruned.record['value']:.4f})"
            )
            return
        except Diverged as e:
            trial.set_user_attr(FAILED, str(e))
            study.tell(trial, state=TrialState.FAIL)
            console.warn(f"trial {trial.number} ({point.name}): failed: {e}")
            return
        if reporter is not None:
            reporter.catch_up(run)
        finals.append(summary["final"][sweep.metric])
    study.tell(trial, statistics.mean(finals))
    console.log(
        f"trial {trial.number} ({point.name}): {sweep.metric} {statistics.mean(finals):.4f} "
        f"(mean of {len(finals)} seed{'s' * (len(finals) > 1)})"
    )


def confirm(sweep: Sweep, study: optuna.Study) -> None:
    """The best points trained again with the confirmation seeds, once no trial runs anywhere."""
    if sweep.spec.confirm is None:
        return
    if running := study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        console.log(
            f"sweep {sweep.name}: {len(running)} trial(s) still run; the best point is known once they "
            f"finish: rerun this command then to confirm it with seeds {sweep.spec.confirm.seeds}"
        )
        return
    for point in top_points(sweep, collect(sweep), sweep.spec.confirm.top):
        with ExitStack() as lock:
            try:
                lock.enter_context(writer_lock(sweep.dir / point.name))
            except Busy:
                continue  # another worker confirms it
            for seed in sweep.spec.confirm.seeds:
                console.log(f"confirm {point.name}: training seed {seed} in {sweep.run_dir(point, seed)}")
                try:
                    train(sweep.recipe(point, seed))
                except Diverged as e:
                    console.warn(f"confirm {point.name}: seed {seed} failed: {e}")


def work(sweep: Sweep) -> None:
    """One worker: claim and train trials until the search is done or the time budget is spent, then confirm."""
    study = open_study(sweep)
    console.log(
        f"sweep {sweep.name}: {sweep.sampler} sampler, {sweep.max_trials or 'unbounded'} trials × "
        f"{len(sweep.seeds)} seed(s), {sweep.metric} ({sweep.direction}), pruner {sweep.spec.pruner.type}; "
        f"runs and storage in {sweep.dir}"
    )
    started, skip = time.monotonic(), set()
    while True:
        minutes = sweep.spec.budget.minutes
        if minutes is not None and time.monotonic() - started >= 60 * minutes:
            console.log(f"sweep {sweep.name}: the time budget ({minutes:g} min) is spent; no new trial")
            break
        claim = claim_next(sweep, study, skip)
        if claim is None:
            break
        with claim.lock:
            try:
                run_trial(sweep, study, claim)
            except Busy as e:  # its run is being trained by an `lrft train` (a --plan command) right now
                console.warn(f"trial {claim.trial.number} ({claim.point.name}): {e}; leaving it")
                skip.add(claim.trial.number)
    confirm(sweep, study)


# ---------------------------------------------------------------------------------------- plans


def planned_points(sweep: Sweep) -> list[Point]:
    """The points --plan prints: a grid's, in the order the sweep tries them; a sampled sweep's trials,
    the next suggestions (up to budget.trials) asked now, without results, and recorded in the
    storage as RUNNING trials nobody holds, so a later `lrft sweep` takes them over (or finds their
    runs done) and the next --plan continues after them."""
    if sweep.sampler == "grid":
        return grid_order(sweep)
    if sweep.max_trials is None:
        raise LrftError(f"{sweep.path}: --plan of a tpe sweep needs budget.trials (how many suggestions to print)")
    study = open_study(sweep)
    with claiming(sweep):
        while search_done(sweep, study) is None:
            study.sampler = make_sampler(sweep, len(study.get_trials(deepcopy=False)))
            trial = study.ask()
            settle_repeat(study, trial, suggest(sweep, trial))
    points = [
        suggest(sweep, t)
        for t in study.get_trials(deepcopy=False)
        if FAILED not in t.user_attrs and set(t.params) == set(sweep.spec.search)
    ]
    return list({p.name: p for p in points}.values())
