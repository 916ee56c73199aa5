"""What a finished run reports: the record summary.json holds (`run_summary`), and the lines
`lrft train` prints on stdout from it (`summary_lines`).
"""

from __future__ import annotations

import resource
import statistics
from pathlib import Path

import torch

from lrft import console
from lrft.precision import Precision
from lrft.recipe import Recipe
from lrft.run_layout import RunDir
from lrft.training.plan import Plan
from lrft.training.state import PHASES, Progress


def run_summary(recipe: Recipe, plan: Plan, progress: Progress, precision: Precision, wall_seconds: float) -> dict:
    """summary.json: what ran (at which precision), the final and best metrics, the counts, where the wall
    time went, peak memory."""
    stats = plan.calibration
    return {
        "name": recipe.name,
        "task": plan.task.name,
        "method": plan.adapted.method.name,
        "model": recipe.model.name,
        "data_source": plan.data.source,
        "precision": precision.record(),
        "final": progress.last_eval,
        "best": {"step": progress.best_step, plan.metric_for_best: progress.best_metric},
        "metric_for_best": plan.metric_for_best,
        "steps": progress.step,
        "epochs": plan.epoch_of(progress.step),
        "train_examples": len(plan.features),
        "trainable_params": plan.trainable_params,
        "head_params": sum(p.numel() for p in plan.head_params),
        "total_params": plan.total_params,
        "wall_seconds": round(wall_seconds, 2),
        "seconds": {phase: round(progress.seconds[phase], 2) for phase in PHASES if phase in progress.seconds},
        "train_seconds": round(progress.seconds.get("training", 0.0), 2),
        "calibration_seconds": round(stats.seconds, 2) if stats is not None else None,
        "skipped_nonfinite": progress.skipped_nonfinite,
        "median_step_time_s": round(statistics.median(progress.step_times), 4) if progress.step_times else None,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        **preference_settings(recipe, plan),
    }


def preference_settings(recipe: Recipe, plan: Plan) -> dict:
    """A preference run's loss and where its reference's log-probs came from; nothing for other tasks."""
    if plan.reference is None:
        return {}
    return {"objective": {"dpo": recipe.train.dpo.model_dump(exclude={"reference"})}, "reference": plan.reference}


def summary_lines(summary: dict, run_dir: Path) -> list[str]:
    """What `lrft train` prints on stdout: where the wall time went, the final and best metrics, the adapter."""
    if "wall_seconds" in summary:
        parts = [
            f"{phase} {console.duration(seconds)}" for phase, seconds in summary["seconds"].items() if seconds >= 0.5
        ]
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
