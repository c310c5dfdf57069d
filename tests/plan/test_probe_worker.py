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

from tunepilot.errors import Terminated, UserError
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


def test_a_killed_worker_reads_none_and_the_next_trial_starts_another():
    worker = ProbeWorker(int, (signal.SIGKILL,), signal.raise_signal)  # each trial: SIGKILL
    try:
        assert worker.trial() is None and worker.exitcode == -signal.SIGKILL
        assert worker.process is None
        assert worker.trial() is None and worker.exitcode == -signal.SIGKILL  # a fresh one
    finally:
        worker.close()


def test_a_worker_that_cannot_start_is_a_clear_error_not_a_size_that_does_not_fit():
    worker = ProbeWorker(int, (3,), os._exit)  # exits with status 3, not killed
    with pytest.raises(UserError, match=r"exited with status 3 before its first trial"):
        worker.trial()


def test_a_worker_that_exits_after_answering_reads_none():
    worker = ProbeWorker(int, (3,), pow)  # trial(e) = 3 ** e, or pow(3, e, 0): an error
    try:
        assert worker.trial(2) == 9
        with pytest.raises(ValueError):
            worker.trial(2, 0)  # the worker's error, raised here; the worker lives on
        worker.conn.send(None)  # the worker exits normally, as if it ended mid-trial
        worker.process.wait()
        assert worker.trial(1) is None and worker.exitcode == 0
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
