"""Evaluation: the task's metrics on its evaluation splits, for classifiers, causal LMs and preference pairs.

Classifiers: logits over the split, batched by length, scored with the task's metrics. Causal LMs:
the response loss averaged over response tokens, its perplexity, and for generation tasks (gsm8k)
greedy generations (batched, left-padded, with a KV cache) scored by exact match of the final answer.
Under several processes each one takes a strided shard and the results are gathered, so metrics
are those of the whole split, computed once.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from lrft import console
from lrft.data import Task, compute_metrics, example_length, features
from lrft.data.causal import extract_answer, prompt_features
from lrft.loss import batch_loss
from lrft.preference import PreferenceLoss


@dataclass
class EvalSet:
    """One evaluation split: features for the loss (and logits), and prompts for generation tasks."""

    features: list[dict]
    prompts: list[dict] = field(default_factory=list)


def shard_batches(model, features: list[dict], collate, batch_size: int, device, rank: int, world: int, what: str):
    """(example indices, batch on `device`) of this process's every world-th feature, shortest first
    (similar lengths in a batch waste little on padding; callers restore the order by index), with the
    model in evaluation mode until the last batch is done; progress shown as `what`."""
    was_training = model.training
    model.eval()
    mine = sorted(range(rank, len(features), world), key=lambda i: example_length(features[i]))
    try:
        for start in console.track(range(0, len(mine), batch_size), what, "batches"):
            idx = mine[start : start + batch_size]
            yield idx, {k: v.to(device) for k, v in collate([features[i] for i in idx]).items()}
    finally:
        model.train(was_training)


@torch.no_grad()
def predict(
    model,
    features: list[dict],
    collate,
    batch_size: int,
    device,
    rank: int = 0,
    world: int = 1,
    autocast=None,
    keep_logits: bool = True,
) -> tuple[np.ndarray, np.ndarray, float, int]:
    """(example indices, logits, summed loss, loss weight) of this process's shard of `features`.

    The loss of a batch is weighted by its examples (classifiers) or its response tokens (causal LMs,
    whose logits are not kept), so the average is over the whole split whatever the batching.
    """
    mine, logits, loss_sum, weight = [], [], 0.0, 0
    for idx, batch in shard_batches(model, features, collate, batch_size, device, rank, world, "evaluation"):
        mine += idx
        with autocast() if autocast else nullcontext():
            if keep_logits:
                out = model(**batch)
                logits.append(out.logits.float().cpu())
                loss = out.loss
            else:  # a causal LM: the loss alone, never the whole batch's logits (lrft.loss)
                loss = batch_loss(model, unwrap(model), batch)
        n = len(idx) if keep_logits else int((batch["labels"][:, 1:] != -100).sum())
        loss_sum += float(loss) * n
        weight += n
        del batch, loss  # before the next batch is made, not after
    stacked = torch.cat(logits).numpy() if logits else np.zeros((0, 1), dtype=np.float32)
    return np.asarray(mine, dtype=np.int64), stacked, loss_sum, weight


@torch.no_grad()
def generate(
    model,
    prompts: list[dict],
    tokenizer,
    max_new_tokens: int,
    batch_size: int,
    device,
    rank: int = 0,
    world: int = 1,
    answer_written: str | None = None,
) -> list[dict]:
    """Greedy completions of this process's shard of `prompts`, each with its index; progress in
    generated token steps (a batch takes up to max_new_tokens of them). With `answer_written` (the
    task's regex), a sequence stops once its completion matches it, and a batch once all of its have."""
    was_training = model.training
    model.eval()
    mine = sorted(range(rank, len(prompts), world), key=lambda i: len(prompts[i]["prompt_ids"]))
    starts = range(0, len(mine), batch_size)
    out = []
    with console.progress("generation", len(starts) * max_new_tokens, "token steps") as phase:
        for b, start in enumerate(starts):
            idx = mine[start : start + batch_size]
            # left padding: every prompt ends where generation starts
            batch = tokenizer.pad(
                {"input_ids": [prompts[i]["prompt_ids"] for i in idx]}, padding_side="left", return_tensors="pt"
            )
            width = batch["input_ids"].shape[1]
            tokens = model.generate(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                streamer=StepCounter(phase),
                stopping_criteria=[stop_when_written(answer_written, tokenizer, width)] if answer_written else None,
            )
            phase.update((b + 1) * max_new_tokens, note=f"batch {b + 1}/{len(starts)}")  # a batch may end early
            for i, completion in zip(idx, tokenizer.batch_decode(tokens[:, width:], skip_special_tokens=True)):
                answer = extract_answer(completion)
                gold = prompts[i]["gold"]
                out.append(
                    {
                        "index": i,
                        "prompt": prompts[i]["prompt"],
                        "completion": completion,
                        "answer": answer,
                        "gold": gold,
                        "correct": answer is not None and answer == gold,
                    }
                )
    model.train(was_training)
    return out


def stop_when_written(pattern: str, tokenizer, width: int):
    """A stopping criterion for `model.generate`: done, per sequence, once the completion (the tokens
    after the `width` prompt columns) matches `pattern`. Greedy decoding makes the same tokens up to
    there as without it, so what is cut off is text after the answer."""
    import re

    from transformers import StoppingCriteria

    answer = re.compile(pattern)

    class AnswerWritten(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            completions = tokenizer.batch_decode(input_ids[:, width:], skip_special_tokens=True)
            return torch.tensor([answer.search(c) is not None for c in completions], device=input_ids.device)

    return AnswerWritten()


class StepCounter:
    """A transformers streamer (put/end) that advances a phase by one per generated token step; the
    first put is the prompt."""

    def __init__(self, phase: console.Phase):
        self.phase, self.prompt_seen = phase, False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.phase.advance()
        self.prompt_seen = True

    def end(self) -> None:
        pass


def evaluate(
    model,
    evals: dict[str, EvalSet],
    task: Task,
    collate,
    *,
    batch_size: int,
    accelerator=None,
    tokenizer=None,
    max_new_tokens: int = 256,
    generation: bool = False,
    shard: bool = True,
    objective: PreferenceLoss | None = None,
) -> tuple[dict, list[dict]]:
    """(metrics, predictions) on every evaluation split; extra splits get suffixed metric names.
    `generation` also scores greedy generations (tasks with `generate`); predictions are its records.
    Preference pairs are scored by `objective`, the run's DPO-family loss (pair_metrics). Processes
    share the examples (`shard`), or each evaluates all of them: a sharded model (FSDP) needs every
    process to run the same forward passes."""
    from accelerate.utils import gather_object

    device = accelerator.device if accelerator else next(model.parameters()).device
    rank = accelerator.process_index if accelerator and shard else 0
    world = accelerator.num_processes if accelerator and shard else 1
    autocast = accelerator.autocast if accelerator else None
    causal = task.problem == "causal_lm"
    results, predictions = {}, []
    for suffix, split in evals.items():
        if task.problem == "preference":
            metrics = pair_metrics(model, split.features, collate, objective, batch_size, device, rank, world, autocast)
            results.update({f"{k}{suffix}": v for k, v in metrics.items()})
            continue
        idx, logits, loss_sum, weight = predict(
            model, split.features, collate, batch_size, device, rank, world, autocast, keep_logits=not causal
        )
        if world > 1:
            parts = gather_object([(idx, logits, loss_sum, weight)])
            idx = np.concatenate([p[0] for p in parts])
            logits = np.concatenate([p[1] for p in parts])
            loss_sum, weight = sum(p[2] for p in parts), sum(p[3] for p in parts)
        loss = loss_sum / max(weight, 1)
        if causal:
            metrics = {"perplexity": math.exp(min(loss, 50.0))}
            if generation and task.generate:
                core = accelerator.unwrap_model(model) if accelerator else model
                records = generate(
                    core, split.prompts, tokenizer, max_new_tokens, batch_size, device, rank, world, task.answer_written
                )
                if world > 1:
                    records = [r for part in gather_object([records]) for r in part]
                records.sort(key=lambda r: r["index"])
                metrics["exact_match"] = sum(r["correct"] for r in records) / max(len(records), 1)
                predictions += [{"split": suffix or "main", **r} for r in records]
        else:
            order = np.argsort(idx)
            labels = np.asarray([split.features[i]["labels"] for i in idx[order]])
            metrics = compute_metrics(task, logits[order], labels)
        metrics["loss"] = loss
        results.update({f"{k}{suffix}": v for k, v in metrics.items()})
    return results, predictions


def pair_metrics(model, features, collate, objective, batch_size: int, device, rank, world, autocast) -> dict:
    """The objective's loss and pair metrics (lrft.preference.pair_sums), their means over every pair."""
    sums = pair_sums(model, features, collate, objective, batch_size, device, rank, world, autocast)
    if world > 1:
        from accelerate.utils import gather_object

        parts = gather_object([sums])
        sums = {k: sum(p[k] for p in parts) for k in sums}
    pairs = sums.pop("pairs")
    return {k: v / pairs for k, v in sums.items()}


@torch.no_grad()
def pair_sums(model, features, collate, objective, batch_size: int, device, rank, world, autocast) -> dict[str, float]:
    """Sums over this process's shard of the pairs of the objective's metrics, its loss and the pair count."""
    sums: dict[str, float] = {}
    for _, batch in shard_batches(model, features, collate, batch_size, device, rank, world, "evaluation"):
        with autocast() if autocast else nullcontext():
            losses, _ = objective.pair_losses(model, unwrap(model), batch)
        for k, v in {**objective.batch_sums(), "loss": float(losses.double().sum())}.items():
            sums[k] = sums.get(k, 0.0) + v
    return sums or {"pairs": 0.0}


def eval_sets(
    task: Task, splits: dict, tokenizer, max_length: int, max_prompt_length: int | None = None
) -> dict[str, EvalSet]:
    """EvalSets of a task's evaluation splits (prompts only for generation tasks)."""
    return {
        suffix: EvalSet(
            features(split, tokenizer, max_length, "evaluation examples", max_prompt_length),
            prompt_features(split, tokenizer) if task.generate else [],
        )
        for suffix, split in splits.items()
    }


def unwrap(model):
    """The model inside a DDP wrapper (the one whose output layer lrft.loss swaps for a pass)."""
    return getattr(model, "module", model)
