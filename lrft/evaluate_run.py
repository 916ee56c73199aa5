"""`lrft eval`: a trained run or PEFT LoRA dir (its adapter rebuilt on its base model), or a plain
model (a merged dir, an alias, a hub id), evaluated on a task's evaluation splits."""

from __future__ import annotations

from pathlib import Path

from lrft.data import collator, get_task, load_task_data
from lrft.errors import LrftError
from lrft.evaluate import eval_sets, evaluate
from lrft.files import check_writable, read_json, write_jsonl
from lrft.guard import check_output
from lrft.models import load_model
from lrft.recipe import DataConfig, ModelConfig
from lrft.rundir import RECIPE, RunDir, data_settings, merged_data_source, open_adapted


def evaluate_target(target: str | Path, *, task_name: str | None = None, data_path: str | None = None,
                    max_samples: int | None = None, max_length: int | None = None, batch_size: int = 64,
                    best: bool = False, predictions_path: Path | None = None, base: str | None = None,
                    force: bool = False) -> dict:
    """The metrics of `target` on the task's evaluation splits; generations go to `predictions_path`
    (default for a run dir: its predictions.jsonl). A run, an export or a merged dir reads the data it
    was trained (or checked) on unless `data_path` says otherwise. Examples are cut at `max_length`
    tokens, by default the run's data.max_length, or for a model the task's (gsm8k: 320, as its recipes)."""
    if predictions_path is not None:
        predictions_path = Path(predictions_path)
        check_output(predictions_path, "--predictions", sources={Path(target): "what this command evaluates"},
                     own=[RunDir(Path(target)).predictions()])
        check_writable(predictions_path, "--predictions", kind="file")
    opened = open_adapted(target, task=task_name, base=base, force=force, best=best)
    if opened is not None:
        a = opened.adapted
        model, tokenizer, task, label_names = a.model, a.tokenizer, a.task, a.label_names
        data_cfg = data_settings(opened, data_path)
        if opened.run_dir is not None:
            predictions_path = predictions_path or RunDir(opened.run_dir).predictions()
    else:
        model, tokenizer, task, label_names = _open_model(target, task_name)
        data_cfg = DataConfig(task=task.name, path=data_path or merged_data_source(Path(target), task.name),
                              max_length=task.max_length)
    if label_names and not task.label_names:  # labels learned from the training data: the data must use them
        data_cfg = data_cfg.model_copy(update={"label_names": list(label_names)})
    data_cfg.max_eval_samples = max_samples or data_cfg.max_eval_samples
    data_cfg.max_length = max_length or data_cfg.max_length
    data = load_task_data(task, data_cfg, need_train=False)
    evals = eval_sets(task, data.evals, tokenizer, data_cfg.max_length)
    model.eval()
    metrics, predictions = evaluate(model, evals, task, collator(task, tokenizer), batch_size=batch_size,
                                    tokenizer=tokenizer, max_new_tokens=data_cfg.max_new_tokens, generation=True)
    if predictions and predictions_path:
        write_jsonl(Path(predictions_path), predictions)
    return {"task": task.name, "examples": sum(len(v.features) for v in evals.values()),
            "max_length": data_cfg.max_length, **metrics}


def _open_model(target: str | Path, task_name: str | None):
    """(model, tokenizer, task, label names) of a plain model dir, alias or hub id evaluated on `task_name`."""
    if not task_name:
        raise LrftError(f"--task: {target} is not an lrft run dir ({RECIPE}); to evaluate it as a model, "
                        f"say which task, e.g. --task glue/mrpc")
    task = get_task(task_name)
    label_names = _read_model_labels(target) or list(task.label_names or [])
    if not label_names and task.problem == "classification":
        raise LrftError(f"--task: {task.name} takes its labels from the training data, and {target} names none "
                        f"(no label names in its config.json); evaluate the lrft run dir it came from instead")
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
