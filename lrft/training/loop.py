"""`lrft train`, top-down: set up → (calibrate) → inject → train → evaluate → save; resumes by itself.

`Trainer` holds one run as named steps a reader can follow: `setup` (the `Plan`: data, model,
calibration, adapters, objective, optimizer and schedule; then the resumption or the start of the
run dir), `fit` (the epochs: `train_step`, the `NonFinitePolicy`, logging, `checkpoint`, `evaluate`
with best tracking, stop requests), `finish` (the last evaluation, adapter and summary). A checkpoint
holds the adapter and head, optimizer, scheduler, every process's RNG state, the position in the
data order and the best metric, so rerunning the same command after a kill or a pre-emption continues
where the last checkpoint left off; a checkpoint is written before the evaluation of its step, and a
resumed run evaluates first if that evaluation was not done. One process at a time writes a run dir
(lrft.training.session.sole_writer); the run dir's layout is lrft.run_layout's.

The training loss of a step is the mean over the step's examples (classification, regression) or
response tokens (causal LMs) of the whole batch, however it is split into micro-batches
(train.grad_accum) and processes (lrft.training.batches). Every call that synchronises the processes
goes through lrft.parallel.Parallel, so each of them shows as one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lrft import calibrate, console, methods, reference
from lrft.adapted_model import Adapted, Base, adapt, adapter_config, load_base
from lrft.atomic_files import append_jsonl, atomic_write_json, atomic_write_text, file_sha256, write_jsonl
from lrft.checkpoint import ADAPTER_FILE, list_checkpoints, load_adapter, save_adapter, save_checkpoint
from lrft.data import PreferenceSplit, TaskData, collator, features, get_task
from lrft.errors import DiskError, LrftError
from lrft.evaluation import evaluate
from lrft.inject import adapted, adapter_parameters, load_saved_state, saved_state
from lrft.parallel import Parallel
from lrft.precision import autocast_for, own_autocast
from lrft.recipe import SEED_LIMIT, Recipe
from lrft.run_layout import RunDir
from lrft.targets import head_modules
from lrft.tracking import Trackers
from lrft.training.batches import epoch_batches, micro_batches
from lrft.training.plan import (
    Plan,
    enable_gradient_checkpointing,
    load_data,
    log_model,
    make_accelerator,
    make_objective,
    make_optimizer,
    reference_mode,
    start_adapter,
    start_regression_head,
    tokenized,
)
from lrft.training.session import (
    check_run_dir,
    finished_summary,
    log_sizes,
    remove_for_restart,
    resume_point,
    rewind_logs,
    sole_writer,
)
from lrft.training.state import (
    Progress,
    Stopwatch,
    checkpoint_tree,
    load_training_state,
    process_rng_state,
    rng_state,
    set_rng_state,
)
from lrft.training.stops import NonFinitePolicy, Stopped, StopSignals, stopped_message
from lrft.training.summary import run_summary

# Called after each evaluation with its metrics.jsonl record and the progress; `lrft sweep` reports
# epoch-end evaluations to its pruner here, and stops a pruned run by raising (the checkpoint of the
# step is already written).
EvalHook = Callable[[dict, Progress], None]


def train(
    recipe: Recipe, restart: bool = False, on_evaluate: EvalHook | None = None, started: float | None = None
) -> dict:
    """Run the recipe to the end; returns the summary written to summary.json. `started`: the
    time.perf_counter() at which the command began (its wall time counts from there)."""
    return Trainer(recipe, restart=restart, on_evaluate=on_evaluate, started=started).run()


class Trainer:
    """One run of a recipe: `run()` = `setup()` → `fit()` → `finish()`, holding the run dir's lock.

    Its state is what `__init__` sets (the run dir, the processes, the progress and the loop's
    bookkeeping) and the `plan` that `setup` sets once; nothing else is added on the way."""

    plan: Plan  # what setup decided; the loop reads it

    def __init__(
        self, recipe: Recipe, restart: bool = False, on_evaluate: EvalHook | None = None, started: float | None = None
    ):
        self.recipe, self.cfg, self.restart, self.on_evaluate = recipe, recipe.train, restart, on_evaluate
        self.started = time.perf_counter() if started is None else started
        self.wall_before = 0.0  # wall time of earlier sessions of a resumed run
        self.run_dir = RunDir(recipe.run_dir)
        self.accelerator, self.precision = make_accelerator(self.cfg, self.run_dir)
        self.eval_autocast = autocast_for(self.precision.eval, self.accelerator.device.type)
        console.set_main_process(self.accelerator.is_main_process)
        self.parallel = Parallel(self.accelerator)
        self.main, self.world, self.rank = self.parallel.main, self.parallel.world, self.parallel.rank
        self.trackers = Trackers(self.accelerator, self.cfg.report_to, self.run_dir.trackers)
        self.progress = Progress()
        self.clock = Stopwatch(self.progress.seconds)
        self.stats_step: int | None = None  # the step adapter_stats.jsonl was last written at
        self.nonfinite = NonFinitePolicy(self.cfg, self.run_dir.checkpoints)
        self.disk_failure: DiskError | None = None  # the main process's write the disk failed under (main_writes)
        self.window_losses: list[float] = []  # the finite losses of the steps since the last logged one
        self.window_sums: dict[str, float] = {}  # the objective's metric sums since the last logged step (batch_sums)
        self.last_checkpoint = time.monotonic()  # when the last checkpoint was written (or fit began)

    def run(self) -> dict:
        check_run_dir(self.run_dir.path, self.restart)
        try:
            with sole_writer(self.run_dir.path, self.parallel):
                summary = finished_summary(self.run_dir, self.recipe, self.restart)
                if summary is None:
                    summary = self.setup_fit_finish()
        except Stopped as stopped:
            console.log(str(stopped))
            # every process leaves after the main one has let go of the lock and said where it stopped: a
            # launcher ends the others as soon as one process has exited
            self.parallel.leave()
            raise
        except DiskError:
            self.parallel.leave()  # every process raises it at the same point (stop_if_disk_failed)
            raise
        self.parallel.leave()
        return summary

    def setup_fit_finish(self) -> dict:
        try:
            with self.clock.phase("loading"):
                self.setup()
            self.fit()
            return self.finish()
        finally:
            self.trackers.finish()

    # ------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        """The plan (make_plan), then the run dir resumed from its newest checkpoint or started afresh."""
        from accelerate.utils import set_seed

        resume_from = None if self.restart else resume_point(self.run_dir, self.recipe)
        set_seed(self.recipe.seed)
        if self.parallel.fsdp and self.recipe.model.quantize:  # FSDP2 shards float parameters, not packed ones
            raise LrftError(
                f"model.quantize: {self.recipe.model.quantize} bases train on one process or under DDP, not FSDP; "
                "drop the FSDP launch config (or model.quantize)"
            )
        console.log(self.precision.describe())
        self.plan = self.make_plan()
        self.prepare_reference()
        if self.world > 1:
            over = self.accelerator.distributed_type.value
            console.log(
                f"{self.world} processes ({self.parallel.kind} over {over}), "
                f"{self.cfg.batch_size // self.world} examples of each batch per process"
            )
            # Every rank started from the same seed (same model init); from here each draws its own dropout masks.
            set_seed((self.recipe.seed + self.rank) % SEED_LIMIT)
        self.resume(resume_from) if resume_from is not None else self.start()
        self.stop_if_disk_failed()
        self.trackers.start(self.recipe, resumed_at=self.progress.step if resume_from is not None else None)

    def make_plan(self) -> Plan:
        """Data, model, calibration (methods that ask for it), adapters, optimizer and schedule, in the
        order of their random draws (the head's initialisation, the calibration's, the adapters')."""
        recipe, cfg = self.recipe, self.cfg
        task, data, metric_for_best = load_data(recipe)
        base = load_base(
            recipe.model, task, data.label_names, recipe.adapter.target_modules, recipe.adapter.params.rank
        )
        if task.problem == "regression" and cfg.train_head:
            start_regression_head(base.model, data)
        train_features, evals = tokenized(recipe, task, data, base)
        collate = collator(task, base.tokenizer)
        objective = make_objective(task, cfg)
        adapted_model, stats = self.adapters(base, data, train_features, collate)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(adapted_model.model)
        trainable = sum(p.numel() for p in adapter_parameters(adapted_model.model))
        head_params = [p for m in head_modules(adapted_model.model).values() for p in m.parameters() if p.requires_grad]
        total_params = sum(p.numel() for p in adapted_model.model.parameters())
        log_model(recipe, adapted_model, trainable, head_params, total_params)
        # Only now, with every recipe problem found, may --restart delete the old run.
        if self.restart and self.main:
            remove_for_restart(self.run_dir)
        self.parallel.barrier()
        if stats is not None:
            self.main_writes(
                lambda: calibrate.save(self.run_dir.calibration, stats, adapted_model.built.meta.get("modules"))
            )
        steps_per_epoch = math.ceil(len(train_features) / cfg.batch_size)
        total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
        eval_pairs = sum(len(e.features) for e in evals.values())
        reference = reference_mode(recipe, task, len(train_features), eval_pairs, steps_per_epoch, total_steps)
        optimizer, scheduler = make_optimizer(cfg, adapted_model.model, head_params, total_steps)
        model, optimizer = self.parallel.prepare(adapted_model.model, optimizer)
        return Plan(
            task=task,
            data=data,
            metric_for_best=metric_for_best,
            features=train_features,
            evals=evals,
            collate=collate,
            objective=objective,
            loss_weights=[objective.example_weight(f) for f in train_features],
            calibration=stats,
            adapted=adapted_model,
            model=model,
            core=self.parallel.unwrap(model),
            optimizer=optimizer,
            scheduler=scheduler,
            trainable_params=trainable,
            head_params=head_params,
            total_params=total_params,
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
            reference=reference,
        )

    def adapters(
        self, base: Base, data: TaskData, train_features: list[dict], train_collate
    ) -> tuple[Adapted, calibrate.Statistics | None]:
        """The recipe's adapters on the base (calibrated first, for methods that calibrate), or those of
        the adapter.init_from run, rebuilt from its config and loaded, which need no calibration."""
        recipe = self.recipe
        if recipe.adapter.init_from:
            config, adapter_dir = start_adapter(recipe, base)
            adapted_model = adapt(base, recipe, saved_meta=config.get("meta"))
            tensors, _ = load_adapter(adapter_dir)
            load_saved_state(adapted_model.model, tensors, str(adapter_dir))
            console.log(f"adapter: starts from {adapter_dir}")
            return adapted_model, None
        examples, collate = (lambda: train_features), train_collate
        if isinstance(data.train, PreferenceSplit):  # pairs calibrate on their prompts and chosen responses
            chosen = data.train.chosen_examples()
            examples = lambda: features(chosen, base.tokenizer, recipe.data.max_length, "calibration examples")  # noqa: E731
            collate = collator(get_task("instruction"), base.tokenizer)
        with self.clock.phase("calibration"):
            stats = self.calibration(base, examples, collate)
        return adapt(base, recipe, calibration=stats), stats

    def calibration(self, base: Base, train_features: Callable[[], list[dict]], collate) -> calibrate.Statistics | None:
        """Statistics for methods that calibrate, before any optimizer exists; None for the others."""
        recipe = self.recipe
        needs = methods.get(recipe.adapter.method).calibration(recipe.adapter.params)
        if not needs:
            return None
        base.model.to(self.accelerator.device)
        cache = recipe.calibration.cache
        cache_dir = None
        if cache:  # a run dir or its calibration/ dir
            given = RunDir(Path(cache))
            cache_dir = given.calibration if given.calibration.is_dir() else given.path
        model_id = {"model": recipe.model.name, "revision": recipe.model.revision, "dtype": recipe.model.dtype}
        return calibrate.obtain(
            base.model,
            base.targets,
            train_features(),
            collate,
            needs,
            cfg=recipe.calibration,
            seed=recipe.seed,
            model_id=model_id,
            own_dir=None if self.restart else self.run_dir.calibration,
            cache_dir=cache_dir,
            accelerator=self.accelerator,
        )

    def prepare_reference(self) -> None:
        """A preference run's precomputed reference log-probs: reused from the run dir's reference/ when
        its fingerprint matches, else computed once now (lrft.reference) and saved there; every pair
        carries them from here on."""
        plan, recipe = self.plan, self.recipe
        if plan.reference != "precomputed":
            return
        splits = {"train": plan.features, **{f"eval{k}": e.features for k, e in plan.evals.items()}}
        start = RunDir(Path(recipe.adapter.init_from)).adapter if recipe.adapter.init_from else None
        model_id = {"model": recipe.model.name, "revision": recipe.model.revision, "dtype": recipe.model.dtype}
        start_sha = file_sha256(start / ADAPTER_FILE) if start is not None else None
        expected = reference.fingerprint(model_id, splits, start_sha, self.precision.train)
        logps = reference.cached(self.run_dir.reference, list(splits), expected)
        (missing,) = self.parallel.any_rank(logps is None)
        pairs = sum(len(f) for f in splits.values())
        if missing:
            with self.clock.phase("reference"):
                t0 = time.perf_counter()
                logps = {name: self.reference_logps(f, with_adapters=start is not None) for name, f in splits.items()}
            self.main_writes(lambda: reference.save(self.run_dir.reference, logps, expected))
            what = "the adapter.init_from policy" if start else "the base model (adapters off)"
            console.log(f"reference: log-probs of {pairs} pairs under {what}, {time.perf_counter() - t0:.1f} s")
        else:
            console.log(f"reference: log-probs of {pairs} pairs reused from {self.run_dir.reference}")
        for name, f in splits.items():
            reference.attach(f, logps[name])

    def reference_logps(self, features: list[dict], with_adapters: bool) -> torch.Tensor:
        """The reference's [chosen, rejected] log-probs of every pair, each process computing its share
        (all of them under FSDP, whose processes run the same forward passes)."""
        plan, acc = self.plan, self.accelerator
        rank, world = (0, 1) if self.parallel.fsdp else (self.rank, self.world)
        mine = reference.compute(
            plan.model,
            plan.core,
            features,
            plan.collate,
            batch_size=self.cfg.eval_batch_size,
            device=acc.device,
            autocast=acc.autocast,
            with_adapters=with_adapters,
            rank=rank,
            world=world,
        )
        parts = self.parallel.all_gather(mine) if world > 1 else [mine]
        out = torch.zeros(len(features), 2, dtype=torch.float64)
        for idx, values in parts:
            out[idx] = values
        return out

    def start(self) -> None:
        if self.main:
            run = self.run_dir
            run.path.mkdir(parents=True, exist_ok=True)
            self.main_writes(lambda: atomic_write_text(run.recipe, self.recipe.to_yaml()))
            for p in (run.metrics, run.adapter_stats):
                p.unlink(missing_ok=True)
            self.write_adapter_stats()

    def resume(self, checkpoint: Path) -> None:
        plan = self.plan
        tree, resumed = load_training_state(checkpoint)
        load_saved_state(plan.core, tree["model"], str(checkpoint))
        plan.optimizer.load_state_dict(tree["optimizer"])
        plan.scheduler.load_state_dict(tree["scheduler"])
        set_rng_state(process_rng_state(tree["rng"], self.rank))
        for phase, seconds in self.progress.seconds.items():  # this session's so far (loading)
            resumed.seconds[phase] = resumed.seconds.get(phase, 0.0) + seconds
        self.progress, self.clock.seconds, self.wall_before = resumed, resumed.seconds, resumed.wall_seconds
        self.stats_step = resumed.step  # written before its checkpoint, if it was a log step or an epoch's end
        if self.main:
            rewind_logs(self.run_dir, resumed)
        console.log(f"resuming from {checkpoint.name} (step {resumed.step}/{plan.total_steps})")

    # -------------------------------------------------------------------------------------- fit

    def fit(self) -> None:
        """The epochs: a step per batch, with logging, checkpoints, evaluations and stop requests."""
        plan, progress = self.plan, self.progress
        if self.cfg.eval_on_start and progress.step == 0 and progress.last_eval_step is None:
            self.evaluate(generation=True)
        elif progress.step and progress.last_eval_step != progress.step and self.eval_due():
            self.evaluate(generation=plan.task.generate and progress.step == plan.total_steps)  # cut short before
        plan.model.train()
        self.window_losses = []
        self.last_checkpoint = time.monotonic()
        batches = None
        with (
            StopSignals() as signals,
            console.progress("training", plan.total_steps, "steps", done=progress.step, plain_lines=False) as shown,
        ):
            while progress.step < plan.total_steps:
                batches = batches or self.epoch_batches(progress.epoch)
                with self.clock.phase("training"):
                    t0 = time.perf_counter()
                    loss = self.optimizer_step(batches[progress.batch])
                    progress.step += 1
                    progress.batch += 1
                    step_time = time.perf_counter() - t0
                    progress.step_times.append(round(step_time, 5))
                    self.log_step(loss, step_time, shown)
                if progress.batch == len(batches):
                    self.end_epoch()
                    batches = None
                stop, overdue = self.requests(signals)
                if stop or overdue or self.checkpoint_due():
                    self.checkpoint()
                if stop:
                    raise Stopped(
                        stopped_message(signals.requested, progress, plan.total_steps, self.run_dir.checkpoints)
                    )
                if self.eval_due():
                    self.evaluate(generation=plan.task.generate and progress.step == plan.total_steps)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches of an epoch (example indices): a function of seed and epoch alone, so a resumed run
        and any number of processes see the same; train.group_by_length groups similar lengths."""
        return epoch_batches(self.plan.features, self.cfg.batch_size, self.recipe.seed, epoch, self.cfg.group_by_length)

    def optimizer_step(self, batch: list[int]) -> float:
        """One optimizer step on a batch of example indices; returns its loss (NaN for a skipped batch)."""
        plan = self.plan
        loss, grad_norm = self.train_step(batch)
        take = self.nonfinite.take_step(self.progress, loss, grad_norm)
        if take:
            plan.optimizer.step()
        plan.scheduler.step()
        plan.optimizer.zero_grad(set_to_none=True)
        return loss if take else math.nan

    def train_step(self, batch: list[int]) -> tuple[float, torch.Tensor]:
        """Forward and backward of a batch in train.grad_accum micro-batches, each process its share
        (lrft.training.batches.micro_batches), through the plan's objective; gradients synchronised
        once, on the last micro-batch; returns (mean loss, gradient norm)."""
        plan, acc = self.plan, self.accelerator
        parts = micro_batches(
            batch, self.cfg.batch_size // self.cfg.grad_accum, plan.loss_weights, self.rank, self.world
        )
        loss_total = 0.0
        for j, (examples, share) in enumerate(parts):
            inputs = {k: v.to(acc.device) for k, v in plan.collate([plan.features[i] for i in examples]).items()}
            with self.parallel.gradient_sync(plan.model, sync=j == len(parts) - 1), acc.autocast():
                loss = plan.objective.loss(plan.model, plan.core, inputs) * share
                # Backward even on a non-finite loss: the gradient all-reduce then carries the NaN to every
                # process, so all of them take the same decision (no rank skips a collective).
                acc.backward(loss)
            loss_total += float(loss.detach())
            if share:  # a process's stand-in example (share 0) is not counted
                for k, v in plan.objective.batch_sums().items():
                    self.window_sums[k] = self.window_sums.get(k, 0.0) + v
        loss_total = self.parallel.mean(loss_total)
        params = [p for g in plan.optimizer.param_groups for p in g["params"]]
        return loss_total, self.parallel.clip_grad_norm(params, self.cfg.max_grad_norm)

    def log_step(self, loss: float, step_time: float, shown: console.Phase) -> None:
        """A metrics.jsonl line every train.log_every steps (the mean loss of the window, and a log line
        off a terminal), and the progress bar."""
        plan, progress = self.plan, self.progress
        if math.isfinite(loss):
            self.window_losses.append(loss)
        if progress.step % self.cfg.log_every == 0 or progress.step == plan.total_steps:
            lr = plan.scheduler.get_last_lr()[0]
            mean = sum(self.window_losses) / len(self.window_losses) if self.window_losses else None
            self.window_losses = []
            self.record(
                {
                    "type": "train",
                    "step": progress.step,
                    "epoch": plan.epoch_of(progress.step),
                    "loss": mean,
                    "lr": lr,
                    "step_time_s": step_time,
                    **self.window_means(),
                }
            )
            self.write_adapter_stats()
            if shown.bar is None:
                console.log(
                    f"step {progress.step}/{plan.total_steps} epoch {plan.epoch_of(progress.step):.2f} "
                    f"loss {mean if mean is None else round(mean, 4)} lr {lr:.2e} {step_time:.2f} s/step"
                )
        shown.update(progress.step, note=f"loss {loss:.4f}")

    def window_means(self) -> dict[str, float]:
        """The means, over every process's examples since the last logged step, of what the objective
        sums besides the loss (a preference loss's rewards and log-probs); every process calls it."""
        if not self.window_sums and not self.plan.objective.batch_sums():
            return {}
        parts = self.parallel.all_gather(self.window_sums)
        self.window_sums = {}
        total = {k: sum(p.get(k, 0.0) for p in parts) for k in sorted({k for p in parts for k in p})}
        count = total.pop("pairs", 0.0)
        return {k: v / count for k, v in total.items()} if count else {}

    def record(self, record: dict) -> None:
        """A metrics record: a line of metrics.jsonl, and a point for the trackers."""
        self.main_writes(lambda: append_jsonl(self.run_dir.metrics, record))
        self.trackers.log(record)

    def end_epoch(self) -> None:
        self.progress.epoch += 1
        self.progress.batch = 0
        self.write_adapter_stats()

    def eval_due(self) -> bool:
        """Evaluate every train.eval_every steps, else at the end of each epoch."""
        progress = self.progress
        if self.cfg.eval_every:
            return progress.step % self.cfg.eval_every == 0
        return progress.step > 0 and progress.batch == 0

    def checkpoint_due(self) -> bool:
        """At the end of each epoch and of training, and every train.save_every steps."""
        progress = self.progress
        return (
            progress.batch == 0
            or progress.step == self.plan.total_steps
            or bool(self.cfg.save_every and progress.step % self.cfg.save_every == 0)
        )

    def requests(self, signals: StopSignals) -> tuple[bool, bool]:
        """(stop, checkpoint overdue): whether any process was asked to stop, and whether
        train.save_every_minutes have passed on any process since the last checkpoint; every process
        stops here if the main one's disk failed under a write of this step (stop_if_disk_failed).
        Every process takes the same decision at the same step (Parallel.any_rank)."""
        minutes = self.cfg.save_every_minutes
        stop, overdue, disk_failed = self.parallel.any_rank(
            signals.requested is not None,
            minutes is not None and time.monotonic() - self.last_checkpoint >= 60 * minutes,
            self.disk_failure is not None,
        )
        self.stop_if_disk_failed(disk_failed)
        return stop, overdue

    # ---------------------------------------------------------------------------- disk failures

    def main_writes(self, write: Callable[[], object]) -> None:
        """A write of the main process (the others do nothing). If the disk fails under it, the failure is
        kept and every later write skipped, so nothing more is written after it (no checkpoint holds a
        metrics line that is not on disk); every process stops together at the next `stop_if_disk_failed`."""
        if not self.main or self.disk_failure is not None:
            return
        try:
            write()
        except DiskError as e:
            self.disk_failure = e

    def stop_if_disk_failed(self, flagged: bool | None = None) -> None:
        """Every process raises the main process's disk failure here, at the same point, naming the last
        complete checkpoint; `flagged`: whether it failed, if Parallel.any_rank said so already (else it
        is asked here: with several processes this is where they all wait for the main one's writes)."""
        if flagged is None:
            (flagged,) = self.parallel.any_rank(self.disk_failure is not None)
        if not flagged:
            return
        failure = None
        if self.main:
            e, last = self.disk_failure, list_checkpoints(self.run_dir.checkpoints)
            kept, then = (
                (f", and the last complete checkpoint is {last[-1].name}", " to resume from it")
                if last
                else (", and no checkpoint was written yet", " to start the run again")
            )
            failure = [e.code, str(e.where), e.what, kept, then]
        failure = self.parallel.broadcast(failure)
        raise DiskError(*failure) from self.disk_failure

    # ------------------------------------------------------------------------- evaluate and save

    def evaluate(self, generation: bool = False) -> None:
        """Metrics on the evaluation splits (and, with `generation`, scored generations: the first and
        last evaluation of a generation task); the best adapter so far is kept in best_adapter/."""
        plan, progress = self.plan, self.progress
        # at train.eval_precision, not the training autocast accelerate wrapped the model's forward in
        with self.clock.phase("evaluation"), own_autocast(plan.model):
            metrics, predictions = evaluate(
                plan.model,
                plan.evals,
                plan.task,
                plan.collate,
                batch_size=self.cfg.eval_batch_size,
                generation_batch_size=self.cfg.generation_batch_size,
                accelerator=self.accelerator,
                autocast=self.eval_autocast,
                tokenizer=plan.adapted.tokenizer,
                max_new_tokens=self.recipe.data.max_new_tokens,
                generation=generation,
                shard=not self.parallel.fsdp,
                objective=plan.objective if plan.task.problem == "preference" else None,
            )
        if predictions:
            self.main_writes(lambda: write_jsonl(self.run_dir.predictions(at_start=progress.step == 0), predictions))
        record = {"type": "eval", "step": progress.step, "epoch": plan.epoch_of(progress.step), **metrics}
        self.record(record)
        console.log("eval step {}: {}".format(progress.step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())))
        progress.last_eval, progress.last_eval_step = metrics, progress.step
        value = metrics[plan.metric_for_best]
        better = progress.best_metric is None or (
            value < progress.best_metric if plan.metric_for_best == "loss" else value > progress.best_metric
        )
        if better:
            progress.best_metric, progress.best_step = value, progress.step
            self.main_writes(lambda: self.save_adapter(self.run_dir.best_adapter))
        if self.on_evaluate is not None:
            self.on_evaluate(record, progress)

    def save_adapter(self, directory: Path) -> None:
        plan = self.plan
        with self.clock.phase("saving"):
            save_adapter(
                directory,
                saved_state(plan.core, self.cfg.train_head),
                adapter_config(self.recipe, plan.adapted, plan.trainable_params, plan.data.source),
            )

    def checkpoint(self) -> None:
        """Checkpoint of this exact step; each process contributes its own RNG state (its dropout stream)."""
        rng = self.parallel.all_gather(rng_state())
        if self.main:
            plan, progress = self.plan, self.progress
            progress.metrics_bytes, progress.stats_bytes = log_sizes(self.run_dir)
            progress.wall_seconds = self.wall_seconds()
            tree = checkpoint_tree(
                saved_state(plan.core, include_head=self.cfg.train_head), plan.optimizer, plan.scheduler, rng, progress
            )
            with self.clock.phase("saving"):
                self.main_writes(
                    lambda: save_checkpoint(self.run_dir.checkpoints, progress.step, tree, self.cfg.keep_last)
                )
        self.last_checkpoint = time.monotonic()
        self.stop_if_disk_failed()  # every process waits for the main one's write, and learns how it went

    def write_adapter_stats(self) -> None:
        """adapter_stats.jsonl lines of this step (once per step: a log step can end an epoch too)."""
        step = self.progress.step
        if not self.main or self.stats_step == step:
            return
        self.stats_step = step
        with torch.no_grad():
            for name, wrapper in adapted(self.plan.core).items():
                record = {"step": step, "epoch": self.plan.epoch_of(step), "module": name, **wrapper.adapter.stats()}
                self.main_writes(lambda record=record: append_jsonl(self.run_dir.adapter_stats, record))

    def finish(self) -> dict:
        """The last evaluation (generation tasks generate at the last step only), the adapter, the summary."""
        progress = self.progress
        if progress.last_eval_step != progress.step:
            self.evaluate(generation=self.plan.task.generate)
        self.main_writes(lambda: self.save_adapter(self.run_dir.adapter))
        summary = run_summary(self.recipe, self.plan, progress, self.precision, self.wall_seconds())
        self.main_writes(lambda: atomic_write_json(self.run_dir.summary, summary))
        self.stop_if_disk_failed()  # every process waits for the main one's writes, and learns how they went
        return summary

    def wall_seconds(self) -> float:
        """Wall time of the run so far: earlier sessions (a resumed run) and this one, from its command's start."""
        return self.wall_before + time.perf_counter() - self.started
