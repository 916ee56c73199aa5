"""Task metrics: GLUE's official scores (accuracy, F1, Matthews correlation, Pearson/Spearman) via
scikit-learn and SciPy, from model outputs and gold labels."""

from __future__ import annotations

import numpy as np

from lrft.data.tasks import Task


def compute_metrics(task: Task, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's official metrics from model outputs and gold labels."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    if task.problem == "regression":
        preds = logits.reshape(len(logits), -1)[:, 0]
        return {"pearson": float(pearsonr(preds, labels)[0]), "spearman": float(spearmanr(preds, labels)[0])}
    preds = logits.argmax(-1)
    fns = {
        "accuracy": lambda: accuracy_score(labels, preds),
        "f1": lambda: f1_score(labels, preds),
        "f1_macro": lambda: f1_score(labels, preds, average="macro"),
        "matthews_correlation": lambda: matthews_corrcoef(labels, preds),
    }
    return {name: float(fns[name]()) for name in task.metrics}
