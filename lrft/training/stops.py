"""How a training run stops before its end: on request, at a step boundary with a checkpoint
(`StopSignals`, `Stopped`, exit code EXIT_STOPPED), or when the loss or the gradients stop being
finite (`NonFinitePolicy`: `Diverged`, or the batch skipped).
"""

from __future__ import annotations

import math
import signal
import threading
from contextlib import ExitStack
from pathlib import Path

import torch

from lrft import console
from lrft.checkpoint import list_checkpoints
from lrft.errors import LrftError
from lrft.signals import handling
from lrft.training.state import Progress

EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped on request with a checkpoint; rerun to resume


class Stopped(Exception):
    """The run stopped on request (a signal) after checkpointing its exact step; rerunning resumes it."""


class Diverged(LrftError):
    """The loss or the gradients became NaN/Inf (a learning rate too large, most often)."""


class StopSignals:
    """SIGTERM, SIGUSR1 and a first SIGINT ask the run to stop at the next step boundary (with a
    checkpoint); a second SIGINT stops at once. Handlers are installed for the training loop only."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.requested: str | None = None
        self.handlers = ExitStack()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.handlers.enter_context(handling(self.SIGNALS, self.handle))
        return self

    def handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested is not None:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.requested = signal.Signals(signum).name
        console.warn(f"{self.requested}: stopping after this step with a checkpoint (a second Ctrl-C stops at once)")

    def __exit__(self, *exc) -> None:
        self.handlers.close()


def stopped_message(requested: str | None, progress: Progress, total_steps: int, checkpoints: Path) -> str:
    """Where a stopped run stopped, and how to go on; `requested`: the signal this process got, if any."""
    last = list_checkpoints(checkpoints)
    why = requested or "another process's stop request"
    return (
        f"stopped on {why} at step {progress.step}/{total_steps} (epoch {progress.epoch}, batch "
        f"{progress.batch}); checkpoint {last[-1].name if last else 'none'} holds it; run the same command "
        f"to resume (exit code {EXIT_STOPPED})"
    )


class NonFinitePolicy:
    """What a NaN/Inf loss or gradient norm does: stop naming the step (default), or skip the batch
    (train.skip_nonfinite) and count it. fp16's loss scaler skips inf gradients by itself."""

    def __init__(self, cfg, checkpoints: Path):
        self.cfg, self.checkpoints = cfg, checkpoints

    def take_step(self, progress: Progress, loss: float, grad_norm) -> bool:
        """True if the optimizer may step; raises (stop) or counts the skip (skip_nonfinite) otherwise."""
        bad_grad = self.cfg.precision != "fp16" and not torch.isfinite(torch.as_tensor(grad_norm)).all()
        if math.isfinite(loss) and not bad_grad:
            return True
        what = f"the loss became {loss}" if not math.isfinite(loss) else f"the gradient norm became {float(grad_norm)}"
        if not self.cfg.skip_nonfinite:
            last = list_checkpoints(self.checkpoints)
            raise Diverged(
                f"train: {what} at step {progress.step + 1}; stopped, the last good checkpoint is "
                f"{last[-1].name if last else 'none'}; lower train.lr (now {self.cfg.lr}), use precision "
                f"fp32, or set train.skip_nonfinite=true to skip such batches"
            )
        progress.skipped_nonfinite += 1
        console.warn(
            f"step {progress.step + 1}: {what}; batch skipped "
            f"({progress.skipped_nonfinite} so far, train.skip_nonfinite)"
        )
        return False
