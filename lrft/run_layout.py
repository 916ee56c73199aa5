"""The run dir's layout, a public contract (README "Run dir"): the names of what a run dir holds, and
their paths. Nothing here reads or creates a file; opening a run is lrft.open_runs', the lock of a dir
lrft.run_lock's.

    <output.dir>/<name>/
      recipe.yaml            the resolved recipe
      metrics.jsonl          a line per logged step and per evaluation
      adapter_stats.jsonl    per module at step 0, each log step and epoch end: ‖ΔW‖_F (and α, ‖B‖_F for tlora)
      summary.json           best and final metrics, counts, times, peak memory
      adapter/ best_adapter/ adapter.safetensors + adapter_config.json
      checkpoints/           resumable checkpoints (lrft.checkpoint)
      calibration/           statistics and plan of methods that calibrate (lrft.calibrate)
      reference/             a preference run's precomputed reference log-probs (lrft.reference)
      analysis/              `lrft analyze` output
      comparisons/<other>/   `lrft analyze --against <other>` output, a dir per run compared with
      predictions.jsonl      generations of generation tasks (predictions_step0.jsonl before training)
      pruned.json            `lrft sweep` stopped the run early: the epoch, the metric, the trial
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RECIPE = "recipe.yaml"  # the file that makes a dir a run dir: lrft.guard never lets a command replace one
METRICS = "metrics.jsonl"
ADAPTER_STATS = "adapter_stats.jsonl"
SUMMARY = "summary.json"
ADAPTER = "adapter"
BEST_ADAPTER = "best_adapter"
CHECKPOINTS = "checkpoints"
CALIBRATION = "calibration"
REFERENCE = "reference"
ANALYSIS = "analysis"
COMPARISONS = "comparisons"
PREDICTIONS = "predictions.jsonl"
PREDICTIONS_AT_START = "predictions_step0.jsonl"
TRACKERS = "trackers"
PRUNED = "pruned.json"
# Every entry a run dir may hold: `train --restart` deletes a run dir only if it holds nothing else.
LAYOUT = frozenset(
    {
        RECIPE,
        METRICS,
        ADAPTER_STATS,
        SUMMARY,
        ADAPTER,
        BEST_ADAPTER,
        CHECKPOINTS,
        CALIBRATION,
        REFERENCE,
        ANALYSIS,
        COMPARISONS,
        PREDICTIONS,
        PREDICTIONS_AT_START,
        TRACKERS,
        PRUNED,
    }
)
MERGE_REPORT = "merge_report.json"  # in a merged model dir: the parity numbers and where their data came from


@dataclass(frozen=True)
class RunDir:
    """Paths of one run dir; nothing is read or created by building one."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    recipe = property(lambda self: self.path / RECIPE)
    metrics = property(lambda self: self.path / METRICS)
    adapter_stats = property(lambda self: self.path / ADAPTER_STATS)
    summary = property(lambda self: self.path / SUMMARY)
    adapter = property(lambda self: self.path / ADAPTER)
    best_adapter = property(lambda self: self.path / BEST_ADAPTER)
    checkpoints = property(lambda self: self.path / CHECKPOINTS)
    calibration = property(lambda self: self.path / CALIBRATION)
    reference = property(lambda self: self.path / REFERENCE)
    analysis = property(lambda self: self.path / ANALYSIS)
    trackers = property(lambda self: self.path / TRACKERS)
    pruned = property(lambda self: self.path / PRUNED)

    def predictions(self, at_start: bool = False) -> Path:
        return self.path / (PREDICTIONS_AT_START if at_start else PREDICTIONS)

    def comparison(self, other: Path) -> Path:
        """Where `lrft analyze` compares this run with the run dir `other`: a dir named after it."""
        return self.path / COMPARISONS / Path(other).resolve().name

    def is_run(self) -> bool:
        return self.recipe.is_file()
