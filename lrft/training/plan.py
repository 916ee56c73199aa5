"""What a training run decides once, before its first step: the `Plan` the loop reads, and the parts
that build it without the trainer (the accelerator, gradient checkpointing, the optimizer and its
schedule, a regression head's start, the model's log line).

`Trainer.make_plan` builds the Plan in one place, in the order of its random draws (the model's
head, the calibration, the adapters' initialisation), so the same seed trains the same run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lrft import calibrate, console
from lrft.adapted_model import Adapted, Base
from lrft.data import Task, TaskData, features, load_task_data
from lrft.data.tasks import split_label
from lrft.data.text_to_text import task_for
from lrft.errors import LrftError
from lrft.evaluation import EvalSet, eval_sets
from lrft.inject import adapter_parameters
from lrft.loss import Objective, objective_for
from lrft.open_runs import trained_adapter_config
from lrft.precision import Precision, resolve
from lrft.preference import REFERENCE_FREE, DPOSettings, PreferenceLoss
from lrft.recipe import Recipe
from lrft.run_layout import RunDir
from lrft.targets import is_encoder_decoder, start_regression_head_at
from lrft.tracking import check_installed

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass(frozen=True)
class Plan:
    """A run's data, model, objective, optimizer and schedule, as `Trainer.make_plan` set them up."""

    task: Task
    data: TaskData  # the examples as loaded: their source, label names, training and evaluation splits
    metric_for_best: str  # what best_adapter/ keeps the best of (train.metric_for_best, or the task's)
    features: list[dict]  # the training examples, tokenized
    evals: dict[str, EvalSet]  # the evaluation splits, tokenized
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    objective: Objective  # the task's loss, and what each example weighs in it
    loss_weights: list[int]  # each training example's weight in its step's mean loss (objective.example_weight)
    calibration: calibrate.Statistics | None  # of methods that calibrate, else None
    adapted: Adapted  # the base model with its adapters, the method, the tokenizer
    model: nn.Module  # the adapted model as the processes run it (DDP-wrapped or sharded)
    core: nn.Module  # the adapted model itself, unwrapped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    trainable_params: int  # adapter parameters
    head_params: list[nn.Parameter]  # the task head's trained parameters (train.train_head)
    total_params: int
    steps_per_epoch: int
    total_steps: int
    reference: str | None = None  # preference runs: "precomputed", "adapters_off" or "none" (a reference-free loss)

    def epoch_of(self, step: int) -> float:
        return round(step / self.steps_per_epoch, 4)


def make_accelerator(cfg, run: RunDir) -> tuple[Accelerator, Precision]:
    """accelerate's Accelerator for train.device and train.precision (auto resolved for the device), its
    trackers in the run dir; and the run's precisions."""
    from accelerate import Accelerator

    # On a machine without an accelerator, cpu=True is also what lets several processes (torchrun, or
    # `accelerate launch --multi_gpu`) form a gloo process group instead of each training alone.
    no_accelerator = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and no_accelerator)
    device_type = "cpu" if on_cpu else "cuda" if torch.cuda.is_available() and cfg.device != "mps" else "mps"
    for key, value in (("precision", cfg.precision), ("eval_precision", cfg.eval_precision)):
        if on_cpu and value == "fp16":  # accelerate would silently train in fp32 there
            raise LrftError(f"train.{key}: fp16 needs a GPU and this run is on the CPU; use bf16 (or fp32) on the CPU")
    precision = resolve(cfg.precision, cfg.eval_precision, device_type)
    check_installed(cfg.report_to)
    mixed_precision = {"fp32": "no"}.get(precision.train, precision.train)
    reset_for(mixed_precision)
    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision=mixed_precision,
        log_with=cfg.report_to or None,
        project_dir=str(run.trackers),
    )
    return accelerator, precision


def reset_for(mixed_precision: str) -> None:
    """Let this process's next Accelerator take `mixed_precision` when an earlier run in it (a sweep's
    trials, a Python caller's runs) set another: accelerate keeps one precision per process and refuses
    a change. Its process group (PartialState) stays."""
    from accelerate.state import AcceleratorState

    earlier = AcceleratorState._shared_state.get("_mixed_precision")
    if earlier is not None and earlier != mixed_precision:
        AcceleratorState._reset_state()


def load_data(recipe: Recipe) -> tuple[Task, TaskData, str]:
    """The task, its examples, and the metric best_adapter/ keeps the best of (checked against the task's)."""
    task = task_for(recipe.data.task, recipe.data.format)
    data = load_task_data(task, recipe.data)
    metric_for_best = recipe.train.metric_for_best or task.main_metric
    if metric_for_best not in task.metrics and metric_for_best != "loss":
        raise LrftError(
            f"train.metric_for_best: {task.name} reports {', '.join(task.metrics)} (and loss), not {metric_for_best!r}"
        )
    console.log(
        f"data: {task.name} from {data.source}: {len(data.train)} train, "
        + ", ".join(f"{len(s)} {split_label(k)}" for k, s in data.evals.items())
    )
    return task, data, metric_for_best


def start_regression_head(model: nn.Module, data: TaskData) -> None:
    """A fresh regression head predicts the training labels' mean before its first step (a resumed run's
    saved head replaces it); before calibration, so importance is measured on a sensible head."""
    labels = [float(y) for y in data.train.label]
    mean = math.fsum(labels) / len(labels)
    if start_regression_head_at(model, mean):
        console.log(f"regression head: bias starts at the training labels' mean, {mean:.4g}")


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """transformers' non-reentrant activation checkpointing: adapters inside a recomputed block still
    get their gradients, with no need for the inputs to require grad."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise LrftError(f"train.gradient_checkpointing: {type(model).__name__} does not support it; set it to false")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def log_model(recipe: Recipe, adapted: Adapted, trainable: int, head_params: list[nn.Parameter], total: int) -> None:
    """The model's log line: its targets, and what the method trains of it."""
    console.log(
        f"model: {recipe.model.name} ({adapted.model.config.model_type}), {len(adapted.targets)} targets "
        f"({', '.join(sorted({t.kind for t in adapted.targets}))}); {adapted.method.name} trains "
        f"{trainable:,} adapter params + {sum(p.numel() for p in head_params):,} head params of {total:,}"
        + (f" (head lr {recipe.train.head_learning_rate:g})" if head_params else "")
    )


def make_optimizer(
    cfg, model: nn.Module, head_params: list[nn.Parameter], total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the adapter (and head) parameters; warmup then the recipe's schedule over total_steps."""
    from transformers import get_scheduler

    groups = [{"params": list(adapter_parameters(model)), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if head_params:
        groups.append({"params": head_params, "lr": cfg.head_learning_rate, "weight_decay": cfg.weight_decay})
    optimizer = torch.optim.AdamW(groups)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = get_scheduler(
        {"constant": "constant_with_warmup"}.get(cfg.scheduler, cfg.scheduler),
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total_steps,
    )
    return optimizer, scheduler


def tokenized(recipe: Recipe, task: Task, data: TaskData, base: Base) -> tuple[list[dict], dict[str, EvalSet]]:
    """The training features and the evaluation sets, tokenized for the base model (an encoder-decoder:
    prompts in its encoder, responses its labels)."""
    seq2seq, d = is_encoder_decoder(base.model), recipe.data
    train = features(data.train, base.tokenizer, d.max_length, "training examples", d.max_prompt_length, seq2seq)
    return train, eval_sets(task, data.evals, base.tokenizer, d.max_length, d.max_prompt_length, seq2seq)


def make_objective(task: Task, cfg) -> Objective:
    """The task's own loss, or for preference pairs train.dpo's loss."""
    if task.problem != "preference":
        return objective_for(task.problem)
    dpo = cfg.dpo
    return PreferenceLoss(DPOSettings(dpo.loss, dpo.beta, dpo.label_smoothing, dpo.simpo_gamma))


def reference_mode(
    recipe: Recipe, task: Task, train_pairs: int, eval_pairs: int, steps_per_epoch: int, total_steps: int
) -> str | None:
    """How a preference run gets its reference's log-probs (None for other tasks). `auto` precomputes
    them when that runs fewer forward passes than the policy's steps and evaluations would run again
    (always, when the reference is an adapter.init_from policy: switching the adapters off gives the base)."""
    dpo, cfg = recipe.train.dpo, recipe.train
    if task.problem != "preference":
        return None
    if dpo.loss in REFERENCE_FREE:
        return "none"
    if dpo.reference != "auto":
        return dpo.reference
    if recipe.adapter.init_from:
        return "precomputed"
    evaluations = (total_steps // cfg.eval_every if cfg.eval_every else math.ceil(total_steps / steps_per_epoch)) + 1
    on_the_fly = total_steps * cfg.batch_size + evaluations * eval_pairs
    return "precomputed" if train_pairs + eval_pairs <= on_the_fly else "adapters_off"


def start_adapter(recipe: Recipe, base: Base) -> tuple[dict, Path]:
    """The adapter config and dir of the adapter.init_from run, checked to fit this recipe: the same
    method, params and target modules on the same base model (its target weights' fingerprint)."""
    run_dir = Path(recipe.adapter.init_from)
    config = trained_adapter_config(run_dir)
    where = f"adapter.init_from: {run_dir}"
    params = recipe.adapter.params.model_dump()
    differ = (
        ("method", config["method"], recipe.adapter.method),
        ("targets", config["targets"], [t.name for t in base.targets]),
        ("a base model of target-weights fingerprint", config["base_model"].get("fingerprint"), base.fingerprint),
        *((f"adapter.params.{k}", config["params"].get(k), v) for k, v in params.items()),
    )
    for what, theirs, ours in differ:
        if theirs != ours:
            raise LrftError(
                f"{where} was trained with {what} {theirs!r} and this recipe has {ours!r}; start from a run "
                f"of the same base model, method and params (or leave adapter.init_from out)"
            )
    return config, RunDir(run_dir).adapter
