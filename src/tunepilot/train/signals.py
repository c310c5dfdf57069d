"""SIGTERM / SIGINT: finish the current step, write a checkpoint, exit cleanly.

Preemptible machines send SIGTERM before killing a job; Ctrl-C sends SIGINT. Either sets a flag
the loop checks between steps, so the checkpoint is always of a whole step.

Under torchrun one Ctrl-C arrives twice, from the terminal and forwarded by the launcher a few
milliseconds later; that echo must not count as the user insisting.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tunepilot.errors import Terminated

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
ECHO_SECONDS = 1.0  # the same signal again this soon, under torchrun, is the launcher's echo


class StopRequest:
    signum: int | None = None
    at: float = 0.0  # time.monotonic() of the first signal

    @property
    def requested(self) -> bool:
        return self.signum is not None


@contextmanager
def graceful_stop() -> Iterator[StopRequest]:
    from tunepilot import distributed  # torch: the CLI imports this module before it needs it

    stop = StopRequest()
    forwarded = distributed.launched()

    def handler(signum: int, _frame: object) -> None:
        if stop.signum is not None:
            echo = forwarded and signum == stop.signum and time.monotonic() - stop.at < ECHO_SECONDS
            if echo:
                return
            raise KeyboardInterrupt  # a second signal: the user insists, stop now
        stop.signum, stop.at = signum, time.monotonic()

    previous = {s: signal.signal(s, handler) for s in EXIT_CODES}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def sigterm_stops() -> Iterator[None]:
    """Outside the loop SIGTERM raises ``Terminated``, so the CLI unwinds (a probe's worker is
    killed on the way) and says so in one line instead of dying silently. The loop's
    ``graceful_stop`` takes over while it runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_signum: int, _frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
