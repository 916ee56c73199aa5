"""What a training checkpoint holds besides the adapter, and where training stands.

`Progress` (the step, the position in the data order, the best metric, the wall time per phase that a
`Stopwatch` keeps), every process's RNG state (`rng_state`), and the parts a checkpoint is made of
(`checkpoint_tree`, read back and checked by `load_training_state`).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lrft.checkpoint import load_tree
from lrft.errors import LrftError

# What a training checkpoint saves, and the container each part is: a resume checks them first.
CHECKPOINT_PARTS = {"model": dict, "optimizer": dict, "scheduler": dict, "rng": (list, dict), "progress": dict}
PHASES = ("loading", "calibration", "reference", "training", "evaluation", "saving")  # where a run's wall time goes


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
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase (PHASES), over every session
    wall_seconds: float = 0.0  # wall time of the run up to this checkpoint, over every session
    skipped_nonfinite: int = 0  # batches skipped by train.skip_nonfinite
    step_times: list[float] = field(default_factory=list)
    metrics_bytes: int = 0  # length of metrics.jsonl / adapter_stats.jsonl at the checkpoint
    stats_bytes: int = 0


class Stopwatch:
    """Wall time per phase into a dict; time in a phase inside another counts for the inner one only."""

    def __init__(self, seconds: dict[str, float]):
        self.seconds = seconds
        self.open: list[list] = []  # [phase, since] of the phases running, innermost last

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        now = time.perf_counter()
        if self.open:
            self._charge(now)
        self.open.append([name, now])
        try:
            yield
        finally:
            now = time.perf_counter()
            self._charge(now)
            self.open.pop()
            if self.open:
                self.open[-1][1] = now

    def _charge(self, now: float) -> None:
        """The innermost open phase's time up to `now`."""
        name, since = self.open[-1]
        self.seconds[name] = self.seconds.get(name, 0.0) + now - since


def checkpoint_tree(
    model_state: dict, optimizer: torch.optim.Optimizer, scheduler, rng: list[dict], progress: Progress
) -> dict:
    """The parts of a training checkpoint (CHECKPOINT_PARTS); `rng`: every process's RNG state, by rank."""
    return {
        "model": model_state,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng,
        "progress": vars(progress),
    }


def load_training_state(checkpoint: Path) -> tuple[dict, Progress]:
    """A checkpoint's parts, checked, and its progress; a damaged one is refused saying what to do."""
    tree = load_tree(checkpoint, CHECKPOINT_PARTS)
    unknown = set(tree["progress"]) - {f.name for f in dataclasses.fields(Progress)}
    if unknown:
        raise LrftError(
            f"{checkpoint}: a damaged checkpoint (progress holds {', '.join(sorted(unknown)[:3])}); "
            f"rerun with --restart to start over"
        )
    return tree, Progress(**tree["progress"])


def rng_state() -> dict:
    """This process's RNG states: Python's, NumPy's, torch's (and CUDA's)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def process_rng_state(saved: list[dict] | dict, rank: int) -> dict:
    """The RNG state a process resumes with: its own (its dropout stream); with another process count
    than the run had, the main process's. A checkpoint of one process may hold a single state."""
    states = saved if isinstance(saved, list) else [saved]
    return states[rank] if rank < len(states) else states[0]
