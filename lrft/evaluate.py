"""Evaluation: logits over an evaluation split, batched by length, scored with the task's metrics.

Under several processes each one scores a strided shard and the predictions are gathered, so the
metrics are those of the whole split, computed once.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from lrft.data import Task, compute_metrics


@torch.no_grad()
def predict(model, features: list[dict], collate, batch_size: int, device, rank: int = 0, world: int = 1,
            autocast=None) -> tuple[np.ndarray, np.ndarray, float]:
    """(example indices, logits, summed loss) of this process's shard of `features`."""
    was_training = model.training
    model.eval()
    mine = list(range(rank, len(features), world))
    # Similar lengths in a batch waste little on padding; order is restored by index afterwards.
    mine.sort(key=lambda i: len(features[i]["input_ids"]))
    logits, loss_sum = [], 0.0
    for start in range(0, len(mine), batch_size):
        idx = mine[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([features[i] for i in idx]).items()}
        with autocast() if autocast else nullcontext():
            out = model(**batch)
        logits.append(out.logits.float().cpu())
        loss_sum += float(out.loss) * len(idx)
    model.train(was_training)
    stacked = torch.cat(logits).numpy() if logits else np.zeros((0, 1), dtype=np.float32)
    return np.asarray(mine, dtype=np.int64), stacked, loss_sum


def evaluate(model, evals: dict[str, list[dict]], task: Task, collate, batch_size: int, accelerator=None) -> dict:
    """The task's metrics (and mean loss) on every evaluation split; suffixed keys for extra splits."""
    from accelerate.utils import gather_object

    device = accelerator.device if accelerator else next(model.parameters()).device
    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    autocast = accelerator.autocast if accelerator else None
    results = {}
    for suffix, features in evals.items():
        idx, logits, loss_sum = predict(model, features, collate, batch_size, device, rank, world, autocast)
        if world > 1:
            parts = gather_object([(idx, logits, loss_sum)])
            idx = np.concatenate([p[0] for p in parts])
            logits = np.concatenate([p[1] for p in parts])
            loss_sum = sum(p[2] for p in parts)
        order = np.argsort(idx)
        labels = np.asarray([features[i]["labels"] for i in idx[order]])
        metrics = compute_metrics(task, logits[order], labels)
        metrics["loss"] = loss_sum / max(len(features), 1)
        results.update({f"{k}{suffix}": v for k, v in metrics.items()})
    return results


def evaluate_target(target, task_name: str | None, data_path: str | None, max_samples: int | None,
                    batch_size: int, best: bool = False) -> dict:
    """`lrft eval`: a run dir (adapter rebuilt from its files) or a plain model dir, on its task."""
    from pathlib import Path

    from transformers import DataCollatorWithPadding

    from lrft.data import encode, get_task, load_task_data
    from lrft.errors import LrftError
    from lrft.recipe import DataConfig, ModelConfig
    from lrft.run import RECIPE_FILE, load_run

    target = Path(target)
    if (target / RECIPE_FILE).is_file():
        recipe, a, config = load_run(target, target / "best_adapter" if best else None)
        model, tokenizer, task, label_names = a.model, a.tokenizer, a.task, a.label_names
        data_cfg = recipe.data.model_copy()
        if task_name and task_name != task.name:
            raise LrftError(f"--task: the run was trained on {task.name}, not {task_name}")
    elif (target / "config.json").is_file():
        if not task_name:
            raise LrftError(f"--task: {target} is a model dir; say which task to evaluate on, e.g. --task glue/mrpc")
        from lrft.models import load_for_classification

        task = get_task(task_name)
        cfg = _read_model_labels(target)
        label_names = cfg or list(task.label_names or [])
        model, tokenizer = load_for_classification(ModelConfig(name=str(target)), task.num_labels or len(label_names),
                                                   label_names or None, task.problem == "regression")
        data_cfg = DataConfig(task=task.name)
    else:
        raise LrftError(f"{target}: neither an lrft run dir ({RECIPE_FILE}) nor a model dir (config.json)")
    if data_path:
        data_cfg.path = data_path
    data_cfg.max_eval_samples = max_samples or data_cfg.max_eval_samples
    data = load_task_data(task, data_cfg, need_train=False)
    evals = {k: encode(s, tokenizer, data_cfg.max_length) for k, s in data.evals.items()}
    model.eval()
    metrics = evaluate(model, evals, task, DataCollatorWithPadding(tokenizer, return_tensors="pt"), batch_size)
    return {"task": task.name, "examples": sum(len(v) for v in evals.values()), **metrics}


def _read_model_labels(model_dir) -> list[str] | None:
    """Label names a merged model dir carries in its config (id2label), if they are real names."""
    import json
    from pathlib import Path

    id2label = json.loads((Path(model_dir) / "config.json").read_text()).get("id2label") or {}
    names = [id2label[k] for k in sorted(id2label, key=int)]
    return None if all(n.startswith("LABEL_") for n in names) else names
