"""The probe's worker process: answers, errors, deaths and the run's own stop reach the parent.

The worker's setup and trial here are builtins, so the tests need no model: ``setup(*args)``
builds the state once, ``trial(state, *request)`` runs per request in the worker.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tunepilot.errors import Terminated
from tunepilot.plan.probe_worker import ProbeWorker
from tunepilot.train.signals import sigterm_stops


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_answers_and_errors_come_back_and_an_error_leaves_the_worker_up():
    worker = ProbeWorker(int, (7,), divmod)  # state 7; trial(d) = divmod(7, d)
    try:
        assert worker.trial(2) == (3, 1)
        pid = worker.process.pid
        with pytest.raises(ZeroDivisionError):  # the worker's exception, raised here
            worker.trial(0)
        assert worker.trial(3) == (2, 1) and worker.process.pid == pid  # it survived the error
        assert worker.base_bytes > 0  # its resident memory before setup, for the peak's shift
    finally:
        worker.close()
    assert gone(pid) and worker.process is None


def test_a_worker_that_dies_reads_none_and_the_next_trial_starts_another():
    worker = ProbeWorker(int, (3,), os._exit)  # every trial ends the worker with status 3
    try:
        assert worker.trial() is None and worker.exitcode == 3
        assert worker.process is None
        assert worker.trial() is None and worker.exitcode == 3  # a fresh worker, same fate
    finally:
        worker.close()


def test_sigterm_while_a_trial_runs_stops_the_run_and_the_worker_at_once():
    worker = ProbeWorker(float, (60,), time.sleep)  # a 60 s trial
    worker._start()
    pid = worker.process.pid
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    tick = time.monotonic()
    timer.start()
    with pytest.raises(Terminated), sigterm_stops():
        worker.trial()
    assert time.monotonic() - tick < 30  # not the trial's 60 s
    assert gone(pid) and worker.process is None
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
