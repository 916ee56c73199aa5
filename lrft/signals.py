"""Signal handlers for the length of a block: installed on entry, the ones before them back on exit.

`lrft train` (lrft.training.stops) turns stop signals into a stop at the next step boundary, and
`lrft sweep --workers` passes them on to its worker processes; both hold their handlers this way.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager


@contextmanager
def handling(signals: Iterable[signal.Signals], handler: Callable) -> Iterator[None]:
    """`handler` for each of `signals` inside the block; the handlers it replaced are restored after it,
    however the block ends. Only the main thread may set handlers (Python's rule)."""
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, replaced in previous.items():
            signal.signal(sig, replaced)
