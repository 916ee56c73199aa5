"""Experiment trackers (`train.report_to`): TensorBoard, Weights & Biases, MLflow, Trackio, ... through
accelerate's trackers, not a hand-written client.

The recipe is logged as the run's configuration (flattened to dotted keys), and every metrics.jsonl
record at its step (`train/loss`, `eval/accuracy`, ...); only the main process logs. A resumed run
continues the same tracker run: the ids trackers give a run (W&B, MLflow) are kept in the run dir's
trackers/ids.json, and TensorBoard purges the steps after the checkpoint it resumes from, which the
run logs again.
"""

from __future__ import annotations

import json
from pathlib import Path

from lrft.atomic_files import atomic_write_json
from lrft.errors import LrftError

# accelerate's tracker names and the pip package that brings each
PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "trackio": "trackio",
    "comet_ml": "comet-ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
}
IDS_FILE = "ids.json"


def check_installed(names: list[str]) -> None:
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    missing = [n for n in names if n not in available]
    if missing:
        raise LrftError(
            f"train.report_to: {missing[0]} is not installed; install it with "
            f"`pip install {PACKAGES[missing[0]]}` or remove it from train.report_to"
        )


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'train': {'lr': 1e-3}} → {'train.lr': 1e-3}; lists and None become strings (what every tracker takes)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


class Trackers:
    """The recipe's trackers for one run, started (or resumed) on the main process."""

    def __init__(self, accelerator, names: list[str], directory: Path):
        self.accelerator, self.names, self.directory = accelerator, names, Path(directory)

    def start(self, recipe, resumed_at: int | None) -> None:
        if not self.names:
            return
        ids_path = self.directory / IDS_FILE
        ids = json.loads(ids_path.read_text()) if resumed_at is not None and ids_path.is_file() else {}
        init = {
            "wandb": {"id": ids.get("wandb"), "resume": "allow"} if ids.get("wandb") else {},
            "mlflow": {"run_id": ids["mlflow"]} if ids.get("mlflow") else {},
            "tensorboard": {"purge_step": resumed_at + 1} if resumed_at is not None else {},
        }
        # a resumed run has logged its configuration already (MLflow refuses a parameter logged twice)
        config = flatten(recipe.model_dump(mode="json")) if resumed_at is None else None
        self.accelerator.init_trackers(recipe.name, config=config, init_kwargs={n: init.get(n, {}) for n in self.names})
        if self.accelerator.is_main_process:
            atomic_write_json(ids_path, {**ids, **self.run_ids()})

    def run_ids(self) -> dict:
        ids = {}
        if "wandb" in self.names:
            ids["wandb"] = self.accelerator.get_tracker("wandb", unwrap=True).id
        if "mlflow" in self.names:
            ids["mlflow"] = self.accelerator.get_tracker("mlflow", unwrap=True).info.run_id
        return ids

    def log(self, record: dict) -> None:
        """A metrics.jsonl record: its numbers under `<type>/<name>` at its step."""
        if not self.names:
            return
        values = {
            f"{record['type']}/{k}": v
            for k, v in record.items()
            if k not in ("type", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        self.accelerator.log(values, step=record["step"])

    def finish(self) -> None:
        # each tracker's own finish: accelerate's end_training would also end the process group, which
        # the run still needs afterwards (a stopped run's last barrier)
        for tracker in self.accelerator.trackers:
            tracker.finish()
