"""SIGTERM / SIGINT: finish the current step, write a checkpoint, exit cleanly.

Preemptible machines send SIGTERM before killing a job; Ctrl-C sends SIGINT. Either sets a flag
the loop checks between steps, so the checkpoint is always of a whole step.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopRequest:
    signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None


@contextmanager
def graceful_stop() -> Iterator[StopRequest]:
    stop = StopRequest()

    def handler(signum: int, _frame: object) -> None:
        if stop.signum is not None:  # a second signal: the user insists, stop now
            raise KeyboardInterrupt
        stop.signum = signum

    previous = {s: signal.signal(s, handler) for s in EXIT_CODES}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
