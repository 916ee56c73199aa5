"""`lrft train`: one run of a recipe, resumable after a kill.

`loop` (the `Trainer`: setup into a `Plan`, the epochs, the last evaluation and the summary) over
`plan` (what setup decides once), `batches` (which examples make each step, and their weights),
`state` (progress, the wall-time stopwatch, RNG and the other parts of a checkpoint), `session` (the
run dir's lifecycle: its lock, a finished run, the resume point, a restart), `stops` (stop requests,
NaN/Inf losses) and `summary` (summary.json and what `lrft train` prints). The loss itself is
lrft.loss's `Objective`; the collectives are lrft.parallel's.

The CLI and `lrft sweep` use what this package exposes here.
"""

from lrft.training.loop import EvalHook, Trainer, train
from lrft.training.state import Progress
from lrft.training.stops import EXIT_STOPPED, Diverged, Stopped
from lrft.training.summary import summary_lines

__all__ = ["EXIT_STOPPED", "Diverged", "EvalHook", "Progress", "Stopped", "Trainer", "summary_lines", "train"]
