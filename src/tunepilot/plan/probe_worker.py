"""Probe trials in a process of their own, so that neither their memory nor a kill reaches the run.

On a CPU, a trial that outgrows the machine's memory is not an exception: the kernel's OOM
killer sends SIGKILL, and in the training process that ends the whole run. Here the worker
dies instead, and the trial reads "does not fit". The worker also takes away what a trial
leaves behind: glibc's retained heap and the worst-case kernels that oneDNN caches per
shape. With the trials inside the training process, the full bf16 benchmark run whose probe
had just run cold peaked at 5.7-6.3 GB; with the worker, at 4.9 GB, as with a cached probe.

A fresh interpreter is started (not forked): libgomp's thread pool does not survive fork, and
a forked child hangs in its first parallel matmul. It is started as ``python -c`` rather than
through multiprocessing's spawn, which imports the caller's main script again in the child:
a script without an ``if __name__ == "__main__":`` guard would plan twice. The worker loads
the model once and serves trials until closed; after a kill the next trial starts a new one.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from tunepilot.errors import UserError
from tunepilot.hardware import resident_bytes

# exit status of a process that died by SIGKILL: the OOM killer's signature
KILLED = -getattr(signal, "SIGKILL", 9)
_in_worker = False


def in_worker() -> bool:
    """Whether this process is a probe worker (where a trial may be killed without harm)."""
    return _in_worker


def _main(fd: int) -> None:
    """The worker process's entry: the parent's import path first, then what to serve."""
    global _in_worker
    _in_worker = True
    conn = Connection(fd)
    sys.path[:] = conn.recv()  # so that the callables below unpickle as in the parent
    setup, args, trial, threads = conn.recv()
    _serve(conn, setup, args, trial, threads)


def _serve(conn: Any, setup: Callable, args: tuple, trial: Callable, threads: int) -> None:
    """The worker: ``state = setup(*args)`` once, then ``trial(state, *request)`` per request."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's; it closes us
    _die_with_parent()
    try:  # if memory runs out, the kernel should pick this process, not the run
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    torch.set_num_threads(threads)
    # the run's console is the parent's: no library warnings or bars from here
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    base = resident_bytes()  # libraries imported, no model yet
    state = None
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the parent is gone
            return
        if request is None:
            return
        try:
            if state is None:
                state = setup(*args)
            reply: tuple = ("point", trial(state, *request), base)
        except Exception as e:  # every failure goes back to the parent
            reply = ("error", e, base)
        try:
            conn.send(reply)
        except OSError:  # the parent is gone
            return
        except Exception:  # one that does not pickle goes as text
            conn.send(("error", RuntimeError(f"{type(reply[1]).__name__}: {reply[1]}"), base))


def _die_with_parent() -> None:
    """Linux ends this process when the run's ends, even mid-trial (a SIGTERM, a kill)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, -KILLED)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError, TypeError):
        pass  # elsewhere the worker ends at its next read of the closed pipe


class ProbeWorker:
    """A worker process that builds its state once and serves trials on it."""

    def __init__(self, setup: Callable, args: tuple, trial: Callable) -> None:
        self.setup, self.args, self.trial_fn = setup, args, trial
        self.process: Any = None
        self.conn: Any = None
        self.exitcode: int | None = None  # of the last worker that died during a trial
        self.answered = 0  # trials the current worker process has answered
        self.base_bytes = 0  # the worker's resident memory before ``setup``: its libraries

    def _start(self) -> None:
        conn, child = multiprocessing.Pipe()
        fd = child.fileno()
        code = "import sys; from tunepilot.plan.probe_worker import _main; _main(int(sys.argv[1]))"
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", code, str(fd)], pass_fds=(fd,), stdin=subprocess.DEVNULL
            )
        except OSError as e:
            conn.close()
            raise UserError(
                f"train.probe_seconds: cannot start the batch probe's worker process with "
                f"{sys.executable!r} ({e.strerror}); set train.probe_seconds=0 to plan "
                "without the probe"
            ) from None
        finally:
            child.close()  # the worker holds its own copy; its death then reads as EOF here
        self.process, self.conn = process, conn
        try:
            conn.send(sys.path)
            conn.send((self.setup, self.args, self.trial_fn, torch.get_num_threads()))
        except ConnectionError:
            pass  # it died already: the first trial's read says how

    def trial(self, *request: Any) -> Any:
        """``trial(state, *request)`` run in the worker; its exception is raised here. None
        when the worker was killed during the trial (``exitcode`` says how)."""
        if self.process is None:
            self._start()
            self.answered = 0
        try:
            self.conn.send(request)
            kind, value, self.base_bytes = self.conn.recv()
        except (EOFError, ConnectionError):
            self.exitcode = self.process.wait()
            self.conn.close()
            self.process = self.conn = None
            if self.exitcode != KILLED and not self.answered:
                # it never got going: not a trial too big, but a worker that cannot start
                raise UserError(
                    f"train.probe_seconds: the batch probe's worker process ({sys.executable} "
                    f"-c ...) exited with status {self.exitcode} before its first trial (its "
                    "own error, if any, is printed above); set train.probe_seconds=0 to plan "
                    "without the probe"
                ) from None
            return None
        except BaseException:  # Ctrl-C or SIGTERM while waiting: the worker goes too, at once
            self.close(wait=False)
            raise
        self.answered += 1
        if kind == "error":
            raise value
        return value

    def close(self, wait: bool = True) -> None:
        """Ask the worker to exit (it frees the model on its way out); kill it if it is
        busy, or at once when not ``wait``."""
        if self.process is None:
            return
        try:
            self.conn.send(None)
            self.process.wait(timeout=10 if wait else 0)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.conn.close()
        self.process = self.conn = None
