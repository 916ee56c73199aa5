"""`lrft train`, top-down: set up → (calibrate) → inject → train → evaluate → save; resumes by itself.

`Trainer` holds one run as named steps a reader can follow: `setup` (data, model, calibration,
adapters, optimizer and schedule, resume), `fit` (the epochs: `train_step`, the `NonFinitePolicy`,
logging, `checkpoint`, `evaluate` with best tracking, stop requests), `finish` (the last evaluation,
adapter and summary). A checkpoint holds the adapter and head, optimizer, scheduler, every process's
RNG state, the position in the data order and the best metric, so rerunning the same command after a
kill or a pre-emption continues where the last checkpoint left off; a checkpoint is written before the
evaluation of its step, and a resumed run evaluates first if that evaluation was not done. One
process at a time writes a run dir (lrft.rundir.writer_lock); the run dir's layout is lrft.rundir's.

The training loss of a step is the mean over the step's examples (classification) or response tokens
(causal LMs) of the whole batch, however it is split into micro-batches (train.grad_accum) and
processes: each micro-batch's mean loss is weighted by its share of the step's examples or tokens,
counted from the batch's indices, which every process knows.
"""

from __future__ import annotations

import dataclasses
import math
import random
import resource
import signal
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lrft import calibrate, console, methods
from lrft.adapt import adapt, adapter_config, load_base
from lrft.checkpoint import CONFIG_FILE, list_checkpoints, load_tree, save_adapter, save_checkpoint
from lrft.data import collator, features, get_task, load_task_data
from lrft.data.causal import IGNORE
from lrft.errors import DiskError, LrftError
from lrft.evaluate import eval_sets, evaluate
from lrft.files import append_jsonl, atomic_write_json, atomic_write_text, check_writable, read_json, write_jsonl
from lrft.guard import check_restartable, remove_run_dir, run_dir_holding
from lrft.inject import adapted, adapter_parameters, load_saved_state, saved_state
from lrft.loss import batch_loss
from lrft.parallel import Parallel
from lrft.recipe import SEED_LIMIT, Recipe
from lrft.rundir import LAYOUT, Busy, RunDir, writer_lock
from lrft.targets import head_modules, start_regression_head_at
from lrft.tracking import Trackers, check_installed

# What `Trainer.checkpoint` saves, and the container each part is: a resume checks them first.
CHECKPOINT_PARTS = {"model": dict, "optimizer": dict, "scheduler": dict, "rng": (list, dict), "progress": dict}
# Recipe keys that may change between a run and its resumption without making it another run; those of
# them that leave the length of training alone leave a finished run finished.
RESUMABLE_CHANGES = {"train.log_every", "train.eval_every", "train.save_every", "train.keep_last", "train.epochs",
                     "train.max_steps", "train.device", "train.save_every_minutes", "train.report_to"}
LENGTH_KEYS = {"train.epochs", "train.max_steps"}
EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped on request with a checkpoint; rerun to resume


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0  # epochs completed
    batch: int = 0  # batches done in the current epoch
    best_metric: float | None = None
    best_step: int | None = None
    last_eval: dict | None = None  # metrics of the latest evaluation, at step last_eval_step
    last_eval_step: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase (PHASES), over every session
    wall_seconds: float = 0.0  # wall time of the run up to this checkpoint, over every session
    skipped_nonfinite: int = 0  # batches skipped by train.skip_nonfinite
    step_times: list[float] = field(default_factory=list)
    metrics_bytes: int = 0  # length of metrics.jsonl / adapter_stats.jsonl at the checkpoint
    stats_bytes: int = 0


# Called after each evaluation with its metrics.jsonl record and the progress; `lrft sweep` reports
# epoch-end evaluations to its pruner here, and stops a pruned run by raising (the checkpoint of the
# step is already written).
EvalHook = Callable[[dict, Progress], None]

PHASES = ("loading", "calibration", "training", "evaluation", "saving")  # where a run's wall time goes


def train(recipe: Recipe, restart: bool = False, on_evaluate: EvalHook | None = None,
          started: float | None = None) -> dict:
    """Run the recipe to the end; returns the summary written to summary.json. `started`: the
    time.perf_counter() at which the command began (its wall time counts from there)."""
    return Trainer(recipe, restart=restart, on_evaluate=on_evaluate, started=started).run()


class Stopwatch:
    """Wall time per phase into a dict; time in a phase inside another counts for the inner one only."""

    def __init__(self, seconds: dict[str, float]):
        self.seconds = seconds
        self.open: list[list] = []  # [phase, since] of the phases running, innermost last

    @contextmanager
    def phase(self, name: str):
        now = time.perf_counter()
        if self.open:
            self._charge(now)
        self.open.append([name, now])
        try:
            yield
        finally:
            now = time.perf_counter()
            self._charge(now)
            self.open.pop()
            if self.open:
                self.open[-1][1] = now

    def _charge(self, now: float) -> None:
        """The innermost open phase's time up to `now`."""
        name, since = self.open[-1]
        self.seconds[name] = self.seconds.get(name, 0.0) + now - since


class Stopped(Exception):
    """The run stopped on request (a signal) after checkpointing its exact step; rerunning resumes it."""


class Diverged(LrftError):
    """The loss or the gradients became NaN/Inf (a learning rate too large, most often)."""


class StopSignals:
    """SIGTERM, SIGUSR1 and a first SIGINT ask the run to stop at the next step boundary (with a
    checkpoint); a second SIGINT stops at once. Handlers are installed for the training loop only."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.requested: str | None = None
        self.previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}
        return self

    def handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested is not None:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.requested = signal.Signals(signum).name
        console.warn(f"{self.requested}: stopping after this step with a checkpoint (a second Ctrl-C stops at once)")

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class NonFinitePolicy:
    """What a NaN/Inf loss or gradient norm does: stop naming the step (default), or skip the batch
    (train.skip_nonfinite) and count it. fp16's loss scaler skips inf gradients by itself."""

    def __init__(self, cfg, checkpoints: Path):
        self.cfg, self.checkpoints = cfg, checkpoints

    def take_step(self, progress: Progress, loss: float, grad_norm) -> bool:
        """True if the optimizer may step; raises (stop) or counts the skip (skip_nonfinite) otherwise."""
        bad_grad = self.cfg.precision != "fp16" and not torch.isfinite(torch.as_tensor(grad_norm)).all()
        if math.isfinite(loss) and not bad_grad:
            return True
        what = f"the loss became {loss}" if not math.isfinite(loss) else f"the gradient norm became {float(grad_norm)}"
        if not self.cfg.skip_nonfinite:
            last = list_checkpoints(self.checkpoints)
            raise Diverged(f"train: {what} at step {progress.step + 1}; stopped, the last good checkpoint is "
                           f"{last[-1].name if last else 'none'}; lower train.lr (now {self.cfg.lr}), use precision "
                           f"fp32, or set train.skip_nonfinite=true to skip such batches")
        progress.skipped_nonfinite += 1
        console.warn(f"step {progress.step + 1}: {what}; batch skipped "
                     f"({progress.skipped_nonfinite} so far, train.skip_nonfinite)")
        return False


class Trainer:
    """One run of a recipe: `run()` = `setup()` → `fit()` → `finish()`, holding the run dir's lock."""

    def __init__(self, recipe: Recipe, restart: bool = False, on_evaluate: EvalHook | None = None,
                 started: float | None = None):
        self.recipe, self.cfg, self.restart, self.on_evaluate = recipe, recipe.train, restart, on_evaluate
        self.started = time.perf_counter() if started is None else started
        self.wall_before = 0.0  # wall time of earlier sessions of a resumed run
        self.run_dir = RunDir(recipe.run_dir)
        self.accelerator = make_accelerator(self.cfg, self.run_dir)
        console.set_main_process(self.accelerator.is_main_process)
        self.main = self.accelerator.is_main_process
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.parallel = Parallel(self.accelerator)
        self.trackers = Trackers(self.accelerator, self.cfg.report_to, self.run_dir.trackers)
        self.progress = Progress()
        self.clock = Stopwatch(self.progress.seconds)
        self.stats_step: int | None = None  # the step adapter_stats.jsonl was last written at
        self.nonfinite = NonFinitePolicy(self.cfg, self.run_dir.checkpoints)
        self.disk_failure: DiskError | None = None  # the main process's write the disk failed under (main_writes)

    def run(self) -> dict:
        self.check_run_dir()
        try:
            with self.sole_writer():
                finished = self.finished_summary()
                if finished is not None:
                    return finished
                try:
                    with self.clock.phase("loading"):
                        self.setup()
                    self.fit()
                    return self.finish()
                finally:
                    self.trackers.finish()
        except Stopped as stopped:
            console.log(str(stopped))
            # every process leaves after the main one has let go of the lock and said where it stopped: a
            # launcher ends the others as soon as one process has exited
            self.accelerator.wait_for_everyone()
            raise

    @contextmanager
    def sole_writer(self):
        """The run dir's lock, held by the main process; every process learns whether it got it."""
        from accelerate.utils import broadcast_object_list

        with ExitStack() as stack:
            problem = None
            if self.main:
                try:
                    stack.enter_context(writer_lock(self.run_dir.path))
                except Busy as e:
                    problem = str(e)
            if self.world > 1:
                problem = broadcast_object_list([problem])[0]
            if problem is not None:
                raise Busy(problem)
            yield

    def finished_summary(self) -> dict | None:
        """The summary of the run if it already finished with this recipe (then nothing is done)."""
        run = self.run_dir
        if self.restart or not (run.is_run() and run.summary.is_file() and (run.adapter / CONFIG_FILE).is_file()):
            return None
        changed = set(recipe_diff(saved_recipe(run).model_dump(mode="json"), self.recipe.model_dump(mode="json")))
        if changed - (RESUMABLE_CHANGES - LENGTH_KEYS):
            return None  # longer training continues it; another recipe is refused by resume_point
        summary = complete_summary(run.summary)
        if summary is None:
            console.warn(f"{run.summary} is damaged; the run is finished again from its last checkpoint, which "
                         f"writes it anew")
            return None
        final = ", ".join(f"{k} {v:.4f}" for k, v in summary["final"].items())
        console.log(f"{run.path} is complete ({summary.get('steps')} steps; {final}); nothing to do. `--restart` "
                    f"trains it again from scratch, a larger train.epochs or train.max_steps continues it")
        return summary

    # ------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        from accelerate.utils import set_seed

        resume_from = None if self.restart else resume_point(self.run_dir, self.recipe)
        set_seed(self.recipe.seed)
        self.load_data()
        self.build_model()
        # Only now, with every recipe problem found, may --restart delete the old run.
        if self.restart and self.main:
            remove_run_dir(self.run_dir.path, LAYOUT)
        self.accelerator.wait_for_everyone()
        self.save_calibration()
        self.model, self.optimizer = self.parallel.prepare(self.model, self.make_optimizer())
        self.unwrapped = self.parallel.unwrap(self.model)
        if self.world > 1:
            console.log(f"{self.world} processes ({self.parallel.kind} over {self.accelerator.distributed_type.value}), "
                        f"{self.cfg.batch_size // self.world} examples of each batch per process")
            # Every rank started from the same seed (same model init); from here each draws its own dropout masks.
            set_seed((self.recipe.seed + self.rank) % SEED_LIMIT)
        self.resume(resume_from) if resume_from is not None else self.start()
        self.stop_if_disk_failed()
        self.trackers.start(self.recipe, resumed_at=self.progress.step if resume_from is not None else None)

    def check_run_dir(self) -> None:
        """Refuse, before anything loads, a run dir lrft cannot write, one inside another run, or (with
        --restart) one it must not delete."""
        path = self.run_dir.path
        check_writable(path, "output.dir")
        around = run_dir_holding(path)
        if around is not None:
            raise LrftError(f"output.dir: {path.parent} is inside the lrft run dir {around}; a run dir never goes "
                            f"inside another run, so set output.dir to a dir of its own (e.g. {around.parent})")
        if self.restart:
            check_restartable(path, LAYOUT)

    def load_data(self) -> None:
        task = self.task = get_task(self.recipe.data.task)
        self.data = load_task_data(task, self.recipe.data)
        self.metric_for_best = self.cfg.metric_for_best or task.main_metric
        if self.metric_for_best not in task.metrics and self.metric_for_best != "loss":
            raise LrftError(f"train.metric_for_best: {task.name} reports {', '.join(task.metrics)} (and loss), "
                            f"not {self.metric_for_best!r}")
        console.log(f"data: {task.name} from {self.data.source}: {len(self.data.train)} train, "
                    + ", ".join(f"{len(s)} eval{k}" for k, s in self.data.evals.items()))

    def build_model(self) -> None:
        """Base model, tokenized data, calibration (methods that ask for it), adapters injected."""
        recipe, task = self.recipe, self.task
        base = load_base(recipe.model, task, self.data.label_names, recipe.adapter.target_modules,
                         recipe.adapter.params.rank)
        if task.problem == "regression" and self.cfg.train_head:
            self.start_regression_head(base.model)
        self.train_features = features(task, self.data.train, base.tokenizer, recipe.data.max_length,
                                       "training examples")
        self.evals = eval_sets(task, self.data.evals, base.tokenizer, recipe.data.max_length)
        self.collate = collator(task, base.tokenizer)
        # what each example weighs in a step's mean loss: its response tokens (those the model predicts:
        # labels after the first position), or 1 for a classification example
        self.loss_weights = [sum(t != IGNORE for t in f["labels"][1:]) if task.problem == "causal_lm" else 1
                             for f in self.train_features]
        with self.clock.phase("calibration"):
            self.stats = self.calibration(base)
        self.adapted = adapt(base, recipe, calibration=self.stats)
        self.model = self.adapted.model
        if self.cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.trainable = sum(p.numel() for p in adapter_parameters(self.model))
        self.head_params = [p for m in head_modules(self.model).values() for p in m.parameters() if p.requires_grad]
        self.total = sum(p.numel() for p in self.model.parameters())
        a = self.adapted
        console.log(f"model: {recipe.model.name} ({self.model.config.model_type}), {len(a.targets)} targets "
                    f"({', '.join(sorted({t.kind for t in a.targets}))}); {a.method.name} trains {self.trainable:,} "
                    f"adapter params + {sum(p.numel() for p in self.head_params):,} head params of {self.total:,}"
                    + (f" (head lr {self.cfg.head_learning_rate:g})" if self.head_params else ""))

    def start_regression_head(self, model) -> None:
        """A fresh regression head predicts the training labels' mean before its first step (a resumed run's
        saved head replaces it); before calibration, so importance is measured on a sensible head."""
        labels = [float(y) for y in self.data.train.label]
        mean = math.fsum(labels) / len(labels)
        if start_regression_head_at(model, mean):
            console.log(f"regression head: bias starts at the training labels' mean, {mean:.4g}")

    def save_calibration(self) -> None:
        if self.stats is not None:
            self.main_writes(lambda: calibrate.save(self.run_dir.calibration, self.stats,
                                                    self.adapted.built.meta.get("modules")))

    def calibration(self, base) -> calibrate.Statistics | None:
        """Statistics for methods that calibrate, before any optimizer exists; None for the others."""
        recipe = self.recipe
        needs = methods.get(recipe.adapter.method).calibration(recipe.adapter.params)
        if not needs:
            return None
        base.model.to(self.accelerator.device)
        cache = recipe.calibration.cache
        cache_dir = None
        if cache:  # a run dir or its calibration/ dir
            cache_dir = RunDir(cache).calibration if RunDir(cache).calibration.is_dir() else Path(cache)
        model_id = {"model": recipe.model.name, "revision": recipe.model.revision, "dtype": recipe.model.dtype}
        return calibrate.obtain(base.model, base.targets, self.train_features, self.collate, needs,
                                cfg=recipe.calibration, seed=recipe.seed, model_id=model_id,
                                own_dir=None if self.restart else self.run_dir.calibration, cache_dir=cache_dir,
                                accelerator=self.accelerator)

    def make_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the adapter (and head) parameters; warmup then the recipe's schedule."""
        from transformers import get_scheduler

        cfg = self.cfg
        self.steps_per_epoch = math.ceil(len(self.train_features) / cfg.batch_size)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        groups = [{"params": list(adapter_parameters(self.model)), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
        if self.head_params:
            groups.append({"params": self.head_params, "lr": cfg.head_learning_rate, "weight_decay": cfg.weight_decay})
        optimizer = torch.optim.AdamW(groups)
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * self.total_steps)
        self.scheduler = get_scheduler({"constant": "constant_with_warmup"}.get(cfg.scheduler, cfg.scheduler),
                                       optimizer, num_warmup_steps=warmup, num_training_steps=self.total_steps)
        return optimizer

    def start(self) -> None:
        if self.main:
            run = self.run_dir
            run.path.mkdir(parents=True, exist_ok=True)
            self.main_writes(lambda: atomic_write_text(run.recipe, self.recipe.to_yaml()))
            for p in (run.metrics, run.adapter_stats):
                p.unlink(missing_ok=True)
            self.write_adapter_stats()

    def resume(self, checkpoint: Path) -> None:
        tree = load_tree(checkpoint, CHECKPOINT_PARTS)
        unknown = set(tree["progress"]) - {f.name for f in dataclasses.fields(Progress)}
        if unknown:
            raise LrftError(f"{checkpoint}: a damaged checkpoint (progress holds {', '.join(sorted(unknown)[:3])}); "
                            f"rerun with --restart to start over")
        load_saved_state(self.unwrapped, tree["model"], str(checkpoint))
        self.optimizer.load_state_dict(tree["optimizer"])
        self.scheduler.load_state_dict(tree["scheduler"])
        states = tree["rng"] if isinstance(tree["rng"], list) else [tree["rng"]]
        # another process count than the run had: the main process's stream
        set_rng_state(states[self.rank] if self.rank < len(states) else states[0])
        known = {f.name for f in dataclasses.fields(Progress)}  # a checkpoint of an older lrft may hold others
        resumed = Progress(**{k: v for k, v in tree["progress"].items() if k in known})
        for phase, seconds in self.progress.seconds.items():  # this session's so far (loading)
            resumed.seconds[phase] = resumed.seconds.get(phase, 0.0) + seconds
        self.progress, self.clock.seconds, self.wall_before = resumed, resumed.seconds, resumed.wall_seconds
        self.stats_step = resumed.step  # written before its checkpoint, if it was a log step or an epoch's end
        if self.main:
            truncate(self.run_dir.metrics, self.progress.metrics_bytes)
            truncate(self.run_dir.adapter_stats, self.progress.stats_bytes)
        console.log(f"resuming from {checkpoint.name} (step {self.progress.step}/{self.total_steps})")

    # -------------------------------------------------------------------------------------- fit

    def fit(self) -> None:
        """The epochs: a step per batch, with logging, checkpoints, evaluations and stop requests."""
        cfg, progress = self.cfg, self.progress
        if cfg.eval_on_start and progress.step == 0 and progress.last_eval_step is None:
            self.evaluate(generation=True)
        elif progress.step and progress.last_eval_step != progress.step and self.eval_due():
            self.evaluate(generation=self.task.generate and progress.step == self.total_steps)  # cut short before
        self.model.train()
        self.window_losses: list[float] = []
        self.last_checkpoint = time.monotonic()
        batches = None
        with StopSignals() as signals, console.progress("training", self.total_steps, "steps", done=progress.step,
                                                        plain_lines=False) as shown:
            while progress.step < self.total_steps:
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
                    raise Stopped(self.stopped_message(signals))
                if self.eval_due():
                    self.evaluate(generation=self.task.generate and progress.step == self.total_steps)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches of an epoch (example indices): a function of seed and epoch alone, so a resumed run
        and any number of processes see the same; train.group_by_length groups similar lengths."""
        order = epoch_order(len(self.train_features), self.recipe.seed, epoch)
        if self.cfg.group_by_length:
            lengths = [len(f["input_ids"]) for f in self.train_features]
            return length_grouped_batches(order, lengths, self.cfg.batch_size, self.recipe.seed, epoch)
        return [order[i:i + self.cfg.batch_size] for i in range(0, len(order), self.cfg.batch_size)]

    def optimizer_step(self, batch: list[int]) -> float:
        """One optimizer step on a batch of example indices; returns its loss (NaN for a skipped batch)."""
        loss, grad_norm = self.train_step(batch)
        take = self.nonfinite.take_step(self.progress, loss, grad_norm)
        if take:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss if take else math.nan

    def train_step(self, batch: list[int]) -> tuple[float, torch.Tensor]:
        """Forward and backward of a batch in train.grad_accum micro-batches, each process its share;
        gradients synchronised once, on the last micro-batch; returns (mean loss, gradient norm).

        Each micro-batch's mean loss is weighted by its examples' (or response tokens') share of the
        whole batch, times the process count that the gradient all-reduce averages over; a process
        with nothing left in a micro-batch runs a zero-weighted one so that every collective is joined."""
        acc, micro = self.accelerator, self.cfg.batch_size // self.cfg.grad_accum
        chunks = [batch[i:i + micro] for i in range(0, len(batch), micro)]
        batch_weight = sum(self.loss_weights[i] for i in batch)
        loss_total = 0.0
        for j, chunk in enumerate(chunks):
            mine = chunk[self.rank::self.world]
            share = sum(self.loss_weights[i] for i in mine) / batch_weight * self.world
            inputs = {k: v.to(acc.device)
                      for k, v in self.collate([self.train_features[i] for i in mine or chunk[:1]]).items()}
            with self.parallel.gradient_sync(self.model, sync=j == len(chunks) - 1), acc.autocast():
                loss = batch_loss(self.model, self.unwrapped, inputs) * share
                # Backward even on a non-finite loss: the gradient all-reduce then carries the NaN to every
                # process, so all of them take the same decision (no rank skips a collective).
                acc.backward(loss)
            loss_total += float(loss.detach())
        if self.world > 1:
            loss_total = float(acc.reduce(torch.tensor(loss_total, device=acc.device), "mean"))
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        return loss_total, self.parallel.clip_grad_norm(params, self.cfg.max_grad_norm)

    def log_step(self, loss: float, step_time: float, shown: console.Phase) -> None:
        """A metrics.jsonl line every train.log_every steps (the mean loss of the window, and a log line
        off a terminal), and the progress bar."""
        progress = self.progress
        if math.isfinite(loss):
            self.window_losses.append(loss)
        if progress.step % self.cfg.log_every == 0 or progress.step == self.total_steps:
            lr = self.scheduler.get_last_lr()[0]
            mean = sum(self.window_losses) / len(self.window_losses) if self.window_losses else None
            self.window_losses = []
            self.record({"type": "train", "step": progress.step, "epoch": self.epoch_of(progress.step), "loss": mean,
                         "lr": lr, "step_time_s": step_time})
            self.write_adapter_stats()
            if shown.bar is None:
                console.log(f"step {progress.step}/{self.total_steps} epoch {self.epoch_of(progress.step):.2f} "
                            f"loss {mean if mean is None else round(mean, 4)} lr {lr:.2e} {step_time:.2f} s/step")
        shown.update(progress.step, note=f"loss {loss:.4f}")

    def record(self, record: dict) -> None:
        """A metrics record: a line of metrics.jsonl, and a point for the trackers."""
        self.main_writes(lambda: append_jsonl(self.run_dir.metrics, record))
        self.trackers.log(record)

    def end_epoch(self) -> None:
        self.progress.epoch += 1
        self.progress.batch = 0
        self.write_adapter_stats()

    def epoch_of(self, step: int) -> float:
        return round(step / self.steps_per_epoch, 4)

    def eval_due(self) -> bool:
        """Evaluate every train.eval_every steps, else at the end of each epoch."""
        progress = self.progress
        if self.cfg.eval_every:
            return progress.step % self.cfg.eval_every == 0
        return progress.step > 0 and progress.batch == 0

    def checkpoint_due(self) -> bool:
        """At the end of each epoch and of training, and every train.save_every steps."""
        progress = self.progress
        return (progress.batch == 0 or progress.step == self.total_steps
                or bool(self.cfg.save_every and progress.step % self.cfg.save_every == 0))

    def requests(self, signals: StopSignals) -> tuple[bool, bool]:
        """(stop, checkpoint overdue): whether any process was asked to stop, and whether
        train.save_every_minutes have passed on any process since the last checkpoint; every process
        stops here if the main one's disk failed under a write of this step (stop_if_disk_failed)."""
        minutes = self.cfg.save_every_minutes
        flags = torch.tensor([signals.requested is not None,
                              minutes is not None and time.monotonic() - self.last_checkpoint >= 60 * minutes,
                              self.disk_failure is not None], dtype=torch.float32)
        if self.world > 1:  # every process takes the same decision at the same step
            import torch.distributed as dist

            flags = flags.to(self.accelerator.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self.stop_if_disk_failed(bool(flags[2]))
        return bool(flags[0]), bool(flags[1])

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
        complete checkpoint; `flagged`: whether it failed, if an all-reduce said so already (else one
        is done here: with several processes this is where they all wait for the main one's writes)."""
        import torch.distributed as dist
        from accelerate.utils import broadcast_object_list

        if flagged is None:
            flagged = self.disk_failure is not None
            if self.world > 1:
                flag = torch.tensor([float(flagged)], device=self.accelerator.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                flagged = bool(flag[0])
        if not flagged:
            return
        failure = None
        if self.main:
            e, last = self.disk_failure, list_checkpoints(self.run_dir.checkpoints)
            kept, then = ((f", and the last complete checkpoint is {last[-1].name}", " to resume from it") if last
                          else (", and no checkpoint was written yet", " to start the run again"))
            failure = [e.code, str(e.where), e.what, kept, then]
        if self.world > 1:
            failure = broadcast_object_list([failure])[0]
        raise DiskError(*failure) from self.disk_failure

    def stopped_message(self, signals: StopSignals) -> str:
        progress, last = self.progress, list_checkpoints(self.run_dir.checkpoints)
        why = signals.requested or "another process's stop request"
        return (f"stopped on {why} at step {progress.step}/{self.total_steps} (epoch {progress.epoch}, batch "
                f"{progress.batch}); checkpoint {last[-1].name if last else 'none'} holds it; run the same command "
                f"to resume (exit code {EXIT_STOPPED})")

    # ------------------------------------------------------------------------- evaluate and save

    def evaluate(self, generation: bool = False) -> None:
        """Metrics on the evaluation splits (and, with `generation`, scored generations: the first and
        last evaluation of a generation task); the best adapter so far is kept in best_adapter/."""
        recipe, progress = self.recipe, self.progress
        with self.clock.phase("evaluation"):
            metrics, predictions = evaluate(self.model, self.evals, self.task, self.collate,
                                            batch_size=self.cfg.eval_batch_size, accelerator=self.accelerator,
                                            tokenizer=self.adapted.tokenizer, max_new_tokens=recipe.data.max_new_tokens,
                                            generation=generation, shard=not self.parallel.fsdp)
        if predictions:
            self.main_writes(lambda: write_jsonl(self.run_dir.predictions(at_start=progress.step == 0), predictions))
        record = {"type": "eval", "step": progress.step, "epoch": self.epoch_of(progress.step), **metrics}
        self.record(record)
        console.log("eval step {}: {}".format(progress.step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())))
        progress.last_eval, progress.last_eval_step = metrics, progress.step
        value = metrics[self.metric_for_best]
        better = progress.best_metric is None or (
            value < progress.best_metric if self.metric_for_best == "loss" else value > progress.best_metric)
        if better:
            progress.best_metric, progress.best_step = value, progress.step
            self.main_writes(lambda: self.save_adapter(self.run_dir.best_adapter))
        if self.on_evaluate is not None:
            self.on_evaluate(record, progress)

    def save_adapter(self, directory: Path) -> None:
        with self.clock.phase("saving"):
            save_adapter(directory, saved_state(self.unwrapped, self.cfg.train_head),
                         adapter_config(self.recipe, self.adapted, self.trainable, self.data.source))

    def checkpoint(self) -> None:
        """Checkpoint of this exact step; each process contributes its own RNG state (its dropout stream)."""
        from accelerate.utils import gather_object

        rng = gather_object([rng_state()]) if self.world > 1 else [rng_state()]
        if self.main:
            progress = self.progress
            progress.metrics_bytes = file_size(self.run_dir.metrics)
            progress.stats_bytes = file_size(self.run_dir.adapter_stats)
            progress.wall_seconds = self.wall_seconds()
            tree = {"model": saved_state(self.unwrapped, include_head=self.cfg.train_head),
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": rng,
                    "progress": vars(progress)}
            with self.clock.phase("saving"):
                self.main_writes(lambda: save_checkpoint(self.run_dir.checkpoints, progress.step, tree,
                                                         self.cfg.keep_last))
        self.last_checkpoint = time.monotonic()
        self.stop_if_disk_failed()  # every process waits for the main one's write, and learns how it went

    def write_adapter_stats(self) -> None:
        """adapter_stats.jsonl lines of this step (once per step: a log step can end an epoch too)."""
        step = self.progress.step
        if not self.main or self.stats_step == step:
            return
        self.stats_step = step
        with torch.no_grad():
            for name, wrapper in adapted(self.unwrapped).items():
                self.main_writes(lambda: append_jsonl(self.run_dir.adapter_stats, {
                    "step": step, "epoch": self.epoch_of(step), "module": name, **wrapper.adapter.stats()}))

    def finish(self) -> dict:
        """The last evaluation (generation tasks generate at the last step only), the adapter, the summary."""
        progress = self.progress
        if progress.last_eval_step != progress.step:
            self.evaluate(generation=self.task.generate)
        self.main_writes(lambda: self.save_adapter(self.run_dir.adapter))
        summary = self.summary()
        self.main_writes(lambda: atomic_write_json(self.run_dir.summary, summary))
        self.stop_if_disk_failed()  # every process waits for the main one's writes, and learns how they went
        return summary

    def wall_seconds(self) -> float:
        """Wall time of the run so far: earlier sessions (a resumed run) and this one, from its command's start."""
        return self.wall_before + time.perf_counter() - self.started

    def summary(self) -> dict:
        progress, stats = self.progress, self.stats
        return {
            "name": self.recipe.name, "task": self.task.name, "method": self.adapted.method.name,
            "model": self.recipe.model.name, "data_source": self.data.source, "final": progress.last_eval,
            "best": {"step": progress.best_step, self.metric_for_best: progress.best_metric},
            "metric_for_best": self.metric_for_best, "steps": progress.step, "epochs": self.epoch_of(progress.step),
            "train_examples": len(self.train_features), "trainable_params": self.trainable,
            "head_params": sum(p.numel() for p in self.head_params), "total_params": self.total,
            "wall_seconds": round(self.wall_seconds(), 2),
            "seconds": {phase: round(progress.seconds[phase], 2) for phase in PHASES if phase in progress.seconds},
            "train_seconds": round(progress.seconds.get("training", 0.0), 2),
            "calibration_seconds": round(stats.seconds, 2) if stats is not None else None,
            "skipped_nonfinite": progress.skipped_nonfinite,
            "median_step_time_s": round(statistics.median(progress.step_times), 4) if progress.step_times else None,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }


def summary_lines(summary: dict, run_dir: Path) -> list[str]:
    """What `lrft train` prints on stdout: where the wall time went, the final and best metrics, the adapter."""
    if "wall_seconds" in summary:
        parts = [f"{phase} {console.duration(seconds)}" for phase, seconds in summary["seconds"].items()
                 if seconds >= 0.5]
        took = f"done in {console.duration(summary['wall_seconds'])}" + (f" ({', '.join(parts)})" if parts else "")
    else:  # a run finished by an older lrft
        took = f"done: training {console.duration(summary['train_seconds'])}"
    final = ", ".join(f"{k} {v:.4f}" for k, v in (summary.get("final") or {}).items())
    best = summary.get("best") or {}
    metric = summary.get("metric_for_best")
    lines = [took, f"final (step {summary.get('steps')}): {final}"]
    if best.get(metric) is not None:
        lines.append(f"best (step {best['step']}): {metric} {best[metric]:.4f} in {RunDir(run_dir).best_adapter}")
    return lines + [f"adapter: {RunDir(run_dir).adapter}"]


# ------------------------------------------------------------------------------------------ helpers

def make_accelerator(cfg, run: RunDir):
    from accelerate import Accelerator

    # On a machine without an accelerator, cpu=True is also what lets several processes (torchrun, or
    # `accelerate launch --multi_gpu`) form a gloo process group instead of each training alone.
    no_accelerator = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and no_accelerator)
    if on_cpu and cfg.precision == "fp16":  # accelerate would silently train in fp32 there
        raise LrftError("train.precision: fp16 needs a GPU and this run is on the CPU; use bf16 (or fp32) on the CPU")
    check_installed(cfg.report_to)
    return Accelerator(cpu=on_cpu, mixed_precision={"fp32": "no"}.get(cfg.precision, cfg.precision),
                       log_with=cfg.report_to or None, project_dir=str(run.trackers))


def enable_gradient_checkpointing(model) -> None:
    """transformers' non-reentrant activation checkpointing: adapters inside a recomputed block still
    get their gradients, with no need for the inputs to require grad."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise LrftError(f"train.gradient_checkpointing: {type(model).__name__} does not support it; set it to false")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of an epoch: a function of seed and epoch alone, so a resumed run sees the same."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def length_grouped_batches(order: list[int], lengths: list[int], batch_size: int, seed: int,
                           epoch: int) -> list[list[int]]:
    """Batches of similar lengths: the epoch's order cut into mega-batches of 50 batches, each sorted by
    length (longest first) and cut into batches; the batches then shuffled, the one holding the longest
    example first (an out-of-memory shows at once). Deterministic in (seed, epoch), as HF's
    LengthGroupedSampler but over whole batches, so every process count sees the same batches."""
    mega = 50 * batch_size
    sorted_runs = [sorted(order[i:i + mega], key=lambda k: -lengths[k]) for i in range(0, len(order), mega)]
    flat = [k for run in sorted_runs for k in run]
    batches = [flat[i:i + batch_size] for i in range(0, len(flat), batch_size)]
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 500_009)
    batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    longest = max(range(len(batches)), key=lambda i: max(lengths[k] for k in batches[i]))
    batches.insert(0, batches.pop(longest))
    return batches


def resume_point(run: RunDir, recipe: Recipe) -> Path | None:
    """The newest checkpoint of the run dir, if the recipe is the run's own. A run dir of another recipe
    is refused, with or without checkpoints: starting afresh in it would overwrite that run."""
    ckpts = list_checkpoints(run.checkpoints)
    if run.is_run():
        changed = [k for k in recipe_diff(saved_recipe(run).model_dump(mode="json"), recipe.model_dump(mode="json"))
                   if k not in RESUMABLE_CHANGES]
        if changed:
            what = "a checkpoint of another recipe" if ckpts else "the run of another recipe"
            raise LrftError(f"{run.path}: holds {what} ({', '.join(changed[:4])} changed); rerun with --restart to "
                            f"start over, or set name=... for a new run")
    return ckpts[-1] if ckpts else None


def saved_recipe(run: RunDir) -> Recipe:
    """The recipe a run dir holds; a damaged one is refused with what to do about it."""
    try:
        return run.read_recipe()
    except LrftError as e:
        raise LrftError(f"{e}; the run dir's recipe is damaged: rerun with --restart to start over, or set "
                        f"name=... for a new run") from None


def complete_summary(path: Path) -> dict | None:
    """A run's summary.json if it holds what `Trainer.summary` writes (the final metrics and the time, as
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


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def file_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def truncate(path: Path, size: int) -> None:
    """Drop what was logged after the checkpoint we resume from; it will be logged again."""
    if path.exists() and path.stat().st_size > size:
        with open(path, "r+b") as f:
            f.truncate(size)
