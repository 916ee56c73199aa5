"""`lrft train`, top-down: set up → (calibrate) → inject → train → evaluate → save; resumes by itself.

The run dir (`output.dir/<name>/`) holds recipe.yaml, metrics.jsonl, adapter_stats.jsonl, the
adapter, best_adapter/, summary.json and checkpoints/. A checkpoint holds the adapter and head,
optimizer, scheduler, RNG states, the position in the data order and the best metric, so rerunning
the same command after a kill continues where the last checkpoint left off.
"""

from __future__ import annotations

import math
import random
import resource
import shutil
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lrft import calibrate, console, methods
from lrft.checkpoint import (append_jsonl, atomic_write_json, atomic_write_text, list_checkpoints, load_tree,
                             save_adapter, save_checkpoint)
from lrft.data import collator, features, get_task, load_task_data
from lrft.errors import LrftError
from lrft.evaluate import eval_sets, evaluate
from lrft.lm_data import write_predictions
from lrft.inject import adapted, adapter_modules, saved_state
from lrft.models import head_modules
from lrft.recipe import Recipe, validate
from lrft.run import ADAPTER_DIR, RECIPE_FILE, adapt, adapter_config, load_base

CKPT_DIR = "checkpoints"
# Recipe keys that may change between a run and its resumption without making it another run.
RESUMABLE_CHANGES = {"train.log_every", "train.eval_every", "train.save_every", "train.keep_last", "train.epochs",
                     "train.max_steps", "train.device"}


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
    train_seconds: float = 0.0
    skipped_nonfinite: int = 0  # batches skipped by train.skip_nonfinite
    step_times: list[float] = field(default_factory=list)
    metrics_bytes: int = 0  # length of metrics.jsonl / adapter_stats.jsonl at the checkpoint
    stats_bytes: int = 0


def train(recipe: Recipe, restart: bool = False) -> dict:
    """Run the recipe to the end; returns the summary written to summary.json."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed

    cfg = recipe.train
    # On a machine without an accelerator, cpu=True is also what lets several processes (torchrun, or
    # `accelerate launch --multi_gpu`) form a gloo process group instead of each training alone.
    no_accelerator = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    accelerator = Accelerator(cpu=cfg.device == "cpu" or (cfg.device == "auto" and no_accelerator),
                              mixed_precision={"fp32": "no"}.get(cfg.precision, cfg.precision))
    console.set_main_process(accelerator.is_main_process)
    main = accelerator.is_main_process
    run_dir = recipe.run_dir
    if restart and main and run_dir.exists():
        shutil.rmtree(run_dir)
    accelerator.wait_for_everyone()
    resume_from = _resume_point(run_dir, recipe)
    set_seed(recipe.seed)

    # ---- setup: data, model, adapters
    task = get_task(recipe.data.task)
    data = load_task_data(task, recipe.data)
    metric_for_best = cfg.metric_for_best or task.main_metric
    if metric_for_best not in task.metrics and metric_for_best != "loss":
        raise LrftError(f"train.metric_for_best: {task.name} reports {', '.join(task.metrics)} (and loss), "
                        f"not {metric_for_best!r}")
    console.log(f"data: {task.name} from {data.source}: {len(data.train)} train, "
                + ", ".join(f"{len(s)} eval{k}" for k, s in data.evals.items()))
    base = load_base(recipe, task, data.label_names)
    train_features = features(task, data.train, base.tokenizer, recipe.data.max_length, "training examples")
    evals = eval_sets(task, data.evals, base.tokenizer, recipe.data.max_length)
    collate = collator(task, base.tokenizer)

    # ---- calibration (methods that ask for it), before any optimizer exists
    method = methods.get(recipe.adapter.method)
    needs = method.calibration(recipe.method_params())
    stats = None
    if needs:
        base.model.to(accelerator.device)
        model_id = {"model": recipe.model.name, "revision": recipe.model.revision, "dtype": recipe.model.dtype}
        stats = calibrate.obtain(base.model, base.targets, train_features, collate, needs, recipe.calibration,
                                 recipe.seed, model_id, run_dir, accelerator)
    a = adapt(base, recipe, calibration=stats)
    if stats is not None and main:
        calibrate.save(run_dir / calibrate.DIR, stats, a.built.meta.get("modules"))
    model = a.model
    trainable = sum(p.numel() for p in adapter_modules(model))
    head_params = [p for m in head_modules(model).values() for p in m.parameters() if p.requires_grad]
    total = sum(p.numel() for p in model.parameters())
    console.log(f"model: {recipe.model.name} ({model.config.model_type}), {len(a.targets)} targets "
                f"({', '.join(sorted({t.kind for t in a.targets}))}); {a.method.name} trains {trainable:,} adapter "
                f"params + {sum(p.numel() for p in head_params):,} head params of {total:,}")

    # ---- optimizer and schedule
    steps_per_epoch = math.ceil(len(train_features) / cfg.batch_size)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    groups = [{"params": list(adapter_modules(model)), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if head_params:
        groups.append({"params": head_params, "lr": cfg.head_lr or cfg.lr, "weight_decay": cfg.weight_decay})
    optimizer = torch.optim.AdamW(groups)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total_steps)
    from transformers import get_scheduler

    scheduler = get_scheduler({"constant": "constant_with_warmup"}.get(cfg.scheduler, cfg.scheduler), optimizer,
                              num_warmup_steps=warmup, num_training_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    world, rank = accelerator.num_processes, accelerator.process_index
    if world > 1:
        console.log(f"{world} processes ({accelerator.distributed_type.value}), {cfg.batch_size // world} examples "
                    f"of each batch per process")
        # Every rank started from the same seed (same model init); from here each draws its own dropout masks.
        set_seed(recipe.seed + rank)

    # ---- resume or start
    progress = Progress()
    metrics_path, stats_path = run_dir / "metrics.jsonl", run_dir / "adapter_stats.jsonl"
    if resume_from is not None:
        progress = _restore(resume_from, unwrapped, optimizer, scheduler, rank)
        if main:
            _truncate(metrics_path, progress.metrics_bytes)
            _truncate(stats_path, progress.stats_bytes)
        console.log(f"resuming from {resume_from.name} (step {progress.step}/{total_steps})")
    elif main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / RECIPE_FILE, recipe.to_yaml())
        for p in (metrics_path, stats_path):
            p.unlink(missing_ok=True)
        _write_stats(stats_path, unwrapped, epoch=0, step=0)

    def checkpoint():
        rng = gather_object([_rng_state()]) if world > 1 else [_rng_state()]  # each process's own dropout stream
        if main:
            progress.metrics_bytes = _size(metrics_path)
            progress.stats_bytes = _size(stats_path)
            tree = {"model": saved_state(unwrapped, include_head=cfg.train_head), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rng, "progress": vars(progress)}
            save_checkpoint(run_dir / CKPT_DIR, progress.step, tree, cfg.keep_last)
        accelerator.wait_for_everyone()

    def run_eval(generation: bool = False) -> None:
        """Metrics on the evaluation splits; `generation` also scores generations (the first and last eval)."""
        metrics, predictions = evaluate(model, evals, task, collate, cfg.eval_batch_size, accelerator, a.tokenizer,
                                        recipe.data.max_new_tokens, generation)
        if predictions and main:
            name = "predictions.jsonl" if progress.step else "predictions_step0.jsonl"
            write_predictions(run_dir / name, predictions)
        record = {"type": "eval", "step": progress.step, "epoch": round(progress.step / steps_per_epoch, 4), **metrics}
        if main:
            append_jsonl(metrics_path, record)
        console.log("eval step {}: {}".format(progress.step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())))
        progress.last_eval, progress.last_eval_step = metrics, progress.step
        value = metrics[metric_for_best]
        better = progress.best_metric is None or (
            value < progress.best_metric if metric_for_best == "loss" else value > progress.best_metric)
        if better:
            progress.best_metric, progress.best_step = value, progress.step
            if main:
                save_adapter(run_dir / "best_adapter", saved_state(unwrapped, cfg.train_head),
                             adapter_config(recipe, a, trainable))

    # ---- train
    if cfg.eval_on_start and progress.step == 0 and progress.last_eval_step is None:
        run_eval(generation=True)
    model.train()
    micro = cfg.batch_size // cfg.grad_accum
    window_losses: list[float] = []
    bar = _progress_bar(total_steps, progress.step)
    t_start = time.perf_counter() - progress.train_seconds
    while progress.step < total_steps:
        order = _epoch_order(len(train_features), recipe.seed, progress.epoch)
        batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        while progress.batch < len(batches) and progress.step < total_steps:
            t0 = time.perf_counter()
            batch = batches[progress.batch]
            loss_total = 0.0
            chunks = [batch[i:i + micro] for i in range(0, len(batch), micro)]
            for j, chunk in enumerate(chunks):
                mine = chunk[rank::world] or chunk[:1]
                inputs = {k: v.to(accelerator.device) for k, v in collate([train_features[i] for i in mine]).items()}
                sync = accelerator.no_sync(model) if j < len(chunks) - 1 else nullcontext()
                with sync, accelerator.autocast():
                    loss = model(**inputs).loss
                    # Backward even on a non-finite loss: DDP's gradient all-reduce then carries the NaN to
                    # every process, so all of them take the same decision below (no rank skips a collective).
                    accelerator.backward(loss / len(chunks))
                loss_total += float(loss.detach()) / len(chunks)
            if world > 1:
                loss_total = float(accelerator.reduce(torch.tensor(loss_total, device=accelerator.device), "mean"))
            params = [p for g in optimizer.param_groups for p in g["params"]]
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)
            # fp16's loss scaler skips steps with inf gradients by itself; elsewhere they are a real failure
            bad_grad = cfg.precision != "fp16" and not torch.isfinite(torch.as_tensor(grad_norm)).all()
            if not math.isfinite(loss_total) or bad_grad:
                what = f"the loss became {loss_total}" if not math.isfinite(loss_total) else \
                    f"the gradient norm became {float(grad_norm)}"
                if not cfg.skip_nonfinite:
                    last = list_checkpoints(run_dir / CKPT_DIR)
                    raise LrftError(f"train: {what} at step {progress.step + 1}; stopped, the last good checkpoint is "
                                    f"{last[-1].name if last else 'none'}; lower train.lr (now {cfg.lr}), use precision "
                                    f"fp32, or set train.skip_nonfinite=true to skip such batches")
                optimizer.zero_grad(set_to_none=True)
                progress.skipped_nonfinite += 1
                console.warn(f"step {progress.step + 1}: {what}; batch skipped "
                             f"({progress.skipped_nonfinite} so far, train.skip_nonfinite)")
                loss_total = math.nan
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.batch += 1
            step_time = time.perf_counter() - t0
            progress.step_times.append(round(step_time, 5))
            if math.isfinite(loss_total):
                window_losses.append(loss_total)
            progress.train_seconds = time.perf_counter() - t_start
            if progress.step % cfg.log_every == 0 or progress.step == total_steps:
                lr = scheduler.get_last_lr()[0]
                record = {"type": "train", "step": progress.step, "epoch": round(progress.step / steps_per_epoch, 4),
                          "loss": sum(window_losses) / len(window_losses) if window_losses else None, "lr": lr,
                          "step_time_s": step_time}
                window_losses = []
                if main:
                    append_jsonl(metrics_path, record)
                if bar is None:
                    console.log(f"step {progress.step}/{total_steps} epoch {record['epoch']:.2f} "
                                f"loss {record['loss'] if record['loss'] is None else round(record['loss'], 4)} "
                                f"lr {lr:.2e} {step_time:.2f} s/step")
            if bar is not None:
                bar.update(progress.step, loss_total)
            if cfg.eval_every and progress.step % cfg.eval_every == 0:
                run_eval(generation=task.generate and progress.step == total_steps)
            if cfg.save_every and progress.step % cfg.save_every == 0 and progress.batch < len(batches):
                checkpoint()
        if progress.batch >= len(batches):  # an epoch ended
            progress.epoch += 1
            progress.batch = 0
            if main:
                _write_stats(stats_path, unwrapped, epoch=progress.epoch, step=progress.step)
            if not cfg.eval_every:
                run_eval(generation=task.generate and progress.step == total_steps)
        checkpoint()
    if bar is not None:
        bar.close()

    # ---- final evaluation (generation tasks generate at the last step only) and outputs
    if progress.last_eval_step != progress.step:
        run_eval(generation=task.generate)
        checkpoint()
    summary = {
        "name": recipe.name, "task": task.name, "method": a.method.name, "model": recipe.model.name,
        "final": progress.last_eval, "best": {"step": progress.best_step, metric_for_best: progress.best_metric},
        "metric_for_best": metric_for_best, "steps": progress.step, "epochs": round(progress.step / steps_per_epoch, 4),
        "train_examples": len(train_features), "trainable_params": trainable,
        "head_params": sum(p.numel() for p in head_params), "total_params": total,
        "train_seconds": round(progress.train_seconds, 2),
        "calibration_seconds": round(stats.seconds, 2) if stats is not None else None,
        "skipped_nonfinite": progress.skipped_nonfinite,
        "median_step_time_s": round(statistics.median(progress.step_times), 4) if progress.step_times else None,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if main:
        save_adapter(run_dir / ADAPTER_DIR, saved_state(unwrapped, cfg.train_head), adapter_config(recipe, a, trainable))
        atomic_write_json(run_dir / "summary.json", summary)
    accelerator.wait_for_everyone()
    return summary


# ------------------------------------------------------------------------------------------ helpers

def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of an epoch: a function of seed and epoch alone, so a resumed run sees the same."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _resume_point(run_dir: Path, recipe: Recipe) -> Path | None:
    ckpts = list_checkpoints(run_dir / CKPT_DIR)
    if not ckpts:
        return None
    saved_path = run_dir / RECIPE_FILE
    if saved_path.is_file():
        import yaml

        saved = validate(yaml.safe_load(saved_path.read_text(encoding="utf-8")), str(saved_path))
        changed = [k for k in _diff(saved.model_dump(mode="json"), recipe.model_dump(mode="json"))
                   if k not in RESUMABLE_CHANGES]
        if changed:
            raise LrftError(f"{run_dir}: holds a checkpoint of another recipe ({', '.join(changed[:4])} changed); "
                            f"rerun with --restart to start over, or set name=... for a new run")
    return ckpts[-1]


def _diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore(path: Path, model, optimizer, scheduler, rank: int) -> Progress:
    from lrft.inject import load_saved_state

    tree = load_tree(path)
    load_saved_state(model, tree["model"], str(path))
    optimizer.load_state_dict(tree["optimizer"])
    scheduler.load_state_dict(tree["scheduler"])
    states = tree["rng"] if isinstance(tree["rng"], list) else [tree["rng"]]
    rng = states[rank] if rank < len(states) else states[0]  # another process count: the main process's stream
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return Progress(**tree["progress"])


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _truncate(path: Path, size: int) -> None:
    """Drop what was logged after the checkpoint we resume from; it will be logged again."""
    if path.exists() and path.stat().st_size > size:
        with open(path, "r+b") as f:
            f.truncate(size)


def _write_stats(path: Path, model, epoch: int, step: int) -> None:
    with torch.no_grad():
        for name, wrapper in adapted(model).items():
            append_jsonl(path, {"epoch": epoch, "step": step, "module": name, **wrapper.adapter.stats()})


class _Bar:
    """A rich progress bar on a terminal."""

    def __init__(self, total: int, done: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                                 TimeRemainingColumn(), console=console.err, transient=True)
        self.task = self.progress.add_task("train", total=total, completed=done, loss="-")
        self.progress.start()

    def update(self, step: int, loss: float) -> None:
        self.progress.update(self.task, completed=step, loss=f"{loss:.4f}")

    def close(self) -> None:
        self.progress.stop()


def _progress_bar(total: int, done: int) -> _Bar | None:
    return _Bar(total, done) if console.interactive() and console._main_process else None
