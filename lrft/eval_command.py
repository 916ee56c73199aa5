"""`lrft eval`: a trained run or PEFT LoRA dir (its adapter rebuilt on its base model), or a plain
model (a merged dir, an alias, a hub id), evaluated on a task's evaluation splits. What it evaluates,
on which data and splits, and the result are logged on stderr; the metrics go to stdout."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from lrft import console, sandbox
from lrft.adapted_model import Opened
from lrft.atomic_files import check_writable, read_json, write_jsonl
from lrft.data import collator, get_task, load_task_data
from lrft.data.tasks import split_label
from lrft.data.text_to_text import task_for
from lrft.errors import LrftError
from lrft.evaluation import eval_sets, evaluate, repeat_prompts
from lrft.guard import check_output
from lrft.models import load_model
from lrft.open_runs import data_settings, merged_data_source, open_adapted, read_run_recipe
from lrft.preference import PreferenceLoss
from lrft.recipe import DataConfig, ModelConfig, TrainConfig
from lrft.run_layout import RECIPE, RunDir
from lrft.targets import is_encoder_decoder
from lrft.training.plan import make_objective


@dataclass(frozen=True)
class Scoring:
    """How `lrft eval` scores beyond its data: running generated code, sampled programs per problem and
    their temperature, a model on a classification task as text (text-to-text)."""

    allow_code_execution: bool = False
    samples: int | None = None
    temperature: float = 0.8
    text_to_text: bool = False


def evaluate_target(
    target: str | Path,
    *,
    task_name: str | None = None,
    data_path: str | None = None,
    max_samples: int | None = None,
    max_length: int | None = None,
    batch_size: int = 64,
    best: bool = False,
    predictions_path: Path | None = None,
    base: str | None = None,
    force: bool = False,
    scoring: Scoring | None = None,
) -> dict:
    """The metrics of `target` on the task's evaluation splits; generations go to `predictions_path`
    (default for a run dir: its predictions.jsonl). A run, an export or a merged dir reads the data it
    was trained (or checked) on unless `data_path` says otherwise. Examples are cut at `max_length`
    tokens, by default the run's data.max_length, or for a model the task's (gsm8k: 320, as its recipes)."""
    started, scoring = time.perf_counter(), scoring or Scoring()
    if task_name and get_task(task_name).executes_code:  # refused before anything loads
        sandbox.require_permission(scoring.allow_code_execution, task_name)
    if predictions_path is not None:
        predictions_path = _checked_predictions(Path(predictions_path), target)
    fmt = "text-to-text" if scoring.text_to_text else "classifier"
    model, tokenizer, task, data_cfg, run_predictions = _open_target(
        target, task_name, data_path, base, force, best, fmt
    )
    predictions_path = predictions_path or run_predictions
    data_cfg.max_eval_samples = max_samples or data_cfg.max_eval_samples
    data_cfg.max_length = max_length or data_cfg.max_length
    evals = _evaluation_sets(task, data_cfg, model, tokenizer)
    temperature = _sampling(task, evals, scoring.samples, scoring.temperature)
    model.eval()
    metrics, predictions = evaluate(
        model,
        evals,
        task,
        collator(task, tokenizer),
        batch_size=batch_size,
        tokenizer=tokenizer,
        max_new_tokens=data_cfg.max_new_tokens,
        generation=True,
        allow_code_execution=scoring.allow_code_execution,
        temperature=temperature,
        objective=_preference_objective(task, target),
    )
    if predictions and predictions_path:
        write_jsonl(Path(predictions_path), predictions)
        console.log(f"predictions: {len(predictions)} generations → {predictions_path}")
    console.log(
        f"eval done in {console.duration(time.perf_counter() - started)}: "
        + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
    )
    return {
        "task": task.name,
        "examples": sum(len(v.features) for v in evals.values()),
        "max_length": data_cfg.max_length,
        **metrics,
    }


def _evaluation_sets(task, data_cfg: DataConfig, model, tokenizer) -> dict:
    """The EvalSets of the task's splits under `data_cfg`, tokenized for `model` (an encoder-decoder's own way)."""
    splits = _load_eval_data(task, data_cfg).evals
    return eval_sets(
        task, splits, tokenizer, data_cfg.max_length, data_cfg.max_prompt_length, is_encoder_decoder(model)
    )


def _sampling(task, evals: dict, samples: int | None, temperature: float) -> float | None:
    """The temperature programs are sampled at with --samples N > 1 (each prompt repeated N times), or
    None: one greedy answer per prompt."""
    if not samples or samples == 1:
        return None
    if not task.executes_code:
        raise LrftError(f"--samples: {task.name} scores one greedy answer per problem; only humaneval samples programs")
    repeat_prompts(evals, samples)
    return temperature


def harness_target(
    target: str | Path,
    task_names: str,
    *,
    num_fewshot: int | None = None,
    include: Path | None = None,
    max_samples: int | None = None,
    batch_size: int = 8,
    chat_template: bool = True,
    base: str | None = None,
    force: bool = False,
    best: bool = False,
) -> dict:
    """lm-eval's results of the comma-separated `task_names` on `target` (a causal LM's run or PEFT dir, on its base, or a causal
    LM) in memory (lrft.harness): {"harness": its flat metrics, "table": its results table}. The chat
    template, where the tokenizer has one, renders every request, as lrft's own tasks do."""
    from lrft import harness

    started = time.perf_counter()
    tasks = [t.strip() for t in task_names.split(",") if t.strip()]
    if not tasks:
        raise LrftError("--harness: no task named; give lm-eval task names, e.g. --harness arc_easy,piqa")
    opened = open_adapted(target, base=base, force=force, best=best)
    if opened is not None and opened.adapted.task.problem not in ("causal_lm", "preference"):
        raise LrftError(
            f"--harness: lm-eval scores causal LMs; {target} adapts a {opened.adapted.task.problem} model "
            f"({opened.adapted.task.name}); evaluate it with lrft eval {target}"
        )
    if opened is not None:
        model, tokenizer = opened.adapted.model, opened.adapted.tokenizer
    else:
        model, tokenizer = load_model(ModelConfig(name=str(target)), get_task("instruction"), None)
    console.log(f"eval {_what(target, opened, best)} with lm-eval")
    chat = chat_template and bool(getattr(tokenizer, "chat_template", None))
    results = harness.run_harness(
        model,
        tokenizer,
        tasks,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        include=include,
        limit=max_samples,
        chat_template=chat,
    )
    metrics = harness.metrics(results)
    console.log(f"harness done in {console.duration(time.perf_counter() - started)}")
    return {"harness": metrics, "chat_template": chat, "table": harness.table(results)}


def _preference_objective(task, target: str | Path) -> PreferenceLoss | None:
    """Preference pairs are scored by the run's own loss (train.dpo), else DPO's defaults, against the
    reference of the adapters switched off: for a plain model, the model itself (its rewards are 0; its
    log-probs are the "before" numbers)."""
    if task.problem != "preference":
        return None
    recipe = read_run_recipe(Path(target)) if RunDir(Path(target)).is_run() else None
    if recipe is not None and recipe.adapter.init_from:
        console.warn(
            f"{target} started from adapter.init_from: its rewards here are against the base model, not "
            "against the policy it started from (the run's own evaluations are)"
        )
    return make_objective(task, recipe.train if recipe is not None else TrainConfig())


def metric_lines(metrics: dict) -> list[str]:
    """`lrft eval`'s lines on stdout: a tab-separated name and value per metric."""
    return [f"{k}\t{v:.4f}" if isinstance(v, float) else f"{k}\t{v}" for k, v in metrics.items()]


def _checked_predictions(path: Path, target: str | Path) -> Path:
    """--predictions, checked to replace nothing this command reads and to be writable."""
    check_output(
        path,
        "--predictions",
        sources={Path(target): "what this command evaluates"},
        own=[RunDir(Path(target)).predictions()],
    )
    check_writable(path, "--predictions", kind="file")
    return path


def _load_eval_data(task, data_cfg: DataConfig):
    """The task's evaluation splits under `data_cfg`, and a log line saying what they hold."""
    data = load_task_data(task, data_cfg, need_train=False)
    split_names = {s.suffix: s.local_file for s in task.eval_splits}
    console.log(
        f"data: {task.name} from {data.source}: "
        + ", ".join(f"{len(s)} {split_names.get(k, split_label(k))}" for k, s in data.evals.items())
        + f", max_length {data_cfg.max_length}"
    )
    return data


def _open_target(
    target: str | Path,
    task_name: str | None,
    data_path: str | None,
    base: str | None,
    force: bool,
    best: bool,
    fmt: str,
):
    """(model, tokenizer, task, data settings, the run's predictions file or None) of what `lrft eval`
    evaluates: a run or PEFT dir rebuilt on its base (its own data unless `data_path`), or a model."""
    opened = open_adapted(target, task=task_name, base=base, force=force, best=best)
    run_predictions = None
    if opened is not None:
        a = opened.adapted
        model, tokenizer, task, label_names = a.model, a.tokenizer, a.task, a.label_names
        data_cfg = data_settings(opened, data_path)
        if opened.run_dir is not None:
            run_predictions = RunDir(opened.run_dir).predictions()
    else:
        model, tokenizer, task, label_names = _open_model(target, task_name, fmt)
        data_cfg = DataConfig(
            task=task.name,
            format=fmt,
            path=data_path or merged_data_source(Path(target), task.name),
            max_length=task.max_length,
            max_new_tokens=task.max_new_tokens,
        )
    console.log(f"eval {_what(target, opened, best)} on {task.name}")
    if label_names and not task.label_names:  # labels learned from the training data: the data must use them
        data_cfg = data_cfg.model_copy(update={"label_names": list(label_names)})
    return model, tokenizer, task, data_cfg, run_predictions


def _what(target: str | Path, opened: Opened | None, best: bool) -> str:
    """What `lrft eval` evaluates, in words: a run (which adapter), a PEFT dir on its base, a model."""
    if opened is None:
        return f"the model {target}"
    method, base = opened.config.get("method"), opened.model_cfg.name
    if opened.run_dir is not None:
        return f"the run {opened.run_dir} ({method} on {base}, its {'best' if best else 'final'} adapter)"
    return f"the PEFT adapter dir {target} ({method} on {base})"


def _open_model(target: str | Path, task_name: str | None, fmt: str = "classifier"):
    """(model, tokenizer, task, label names) of a plain model dir, alias or hub id evaluated on `task_name`."""
    if not task_name:
        raise LrftError(
            f"--task: {target} is not an lrft run dir ({RECIPE}); to evaluate it as a model, "
            f"say which task, e.g. --task glue/mrpc"
        )
    task = task_for(task_name, fmt)
    label_names = _read_model_labels(target) or list(task.label_names or [])
    if not label_names and task.problem == "classification":
        raise LrftError(
            f"--task: {task.name} takes its labels from the training data, and {target} names none "
            f"(no label names in its config.json); evaluate the lrft run dir it came from instead"
        )
    model, tokenizer = load_model(ModelConfig(name=str(target)), task, label_names or None)
    return model, tokenizer, task, label_names


def _read_model_labels(model_dir) -> list[str] | None:
    """Label names a merged model dir carries in its config (id2label), if they are real names."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return None
    id2label = read_json(config, "model config").get("id2label") or {}
    if not isinstance(id2label, dict) or not all(str(k).isdigit() for k in id2label):
        return None
    names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    return None if all(n.startswith("LABEL_") for n in names) else names
