"""Host memory for CPU training: tcmalloc where installed, else glibc from a trimmed heap.

Over a long run glibc's heap fragments: every step brings packed rows of new lengths, so new
tensor sizes and new cached oneDNN kernels, and the kernels (small, long-lived) land in the
holes between the big blocks (80 steps of the full bf16 benchmark job: the heap grew to 4-5x
its allocated part). tcmalloc keeps small objects apart from big spans. Measured through the
CLI (benchmarks/long_run.py, 80 steps, 2 rounds): 349-381 tokens/s against 315-344 with glibc
over every 20-step range, peak RSS flat at 5.3 GB against 6.5 GB. So the CLI restarts itself
with tcmalloc preloaded when the system has it (``relaunch_with_tcmalloc``).

Under glibc, training runs with glibc's defaults. Until session 16 the loop told malloc to take
every block from its heap and never trim it (no mmap: a freed 113 MB weight gradient was reused
instead of unmapped and page-faulted back in), which measured +22-28% on 16-step runs before
the attention changes. Over long runs it no longer paid: the full bf16 job through the CLI
(benchmarks/results/2026-12-06-glibc-settings-ab-s16.txt) ran at the same speed within this
machine's noise (+2-5% on average) while its peak RSS climbed further: 8.2 against 6.8 GB at
step 80 (2 rounds), 10.0 against 8.4 GB at step 160 (session 15, one run: 8.4 against 6.5 GB
at step 80, the defaults faster). The heap is trimmed on the way in: what ran before
training (the LR finder, the first evaluation) leaves freed memory resident otherwise. It is
trimmed on the way out too, so memory returns to the system for evaluation and export. Only
glibc has ``malloc_trim``; elsewhere (musl, macOS) this does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tunepilot.errors import UserError

# TUNEPILOT_ALLOCATOR: "auto" (tcmalloc when installed), "tcmalloc" (required) or "system"
CHOICE = "TUNEPILOT_ALLOCATOR"
CHOICES = ("auto", "tcmalloc", "system")
# set in the restarted process, so that a preload the loader ignored cannot restart it again
RELAUNCHED = "TUNEPILOT_RELAUNCHED"


def find_tcmalloc() -> str | None:
    """The installed tcmalloc's library name (gperftools; Debian's libtcmalloc-minimal4)."""
    for name in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def _installed_tcmalloc() -> str | None:
    """tcmalloc to preload: the installed library, on Linux only (LD_PRELOAD as used here)."""
    return find_tcmalloc() if platform.system() == "Linux" else None


def _tcmalloc() -> ctypes.CDLL | None:
    """This process's symbols, where tcmalloc serves its malloc; else None."""
    try:
        symbols = ctypes.CDLL(None)
    except OSError:
        return None
    return symbols if hasattr(symbols, "MallocExtension_ReleaseFreeMemory") else None


def tcmalloc_loaded() -> bool:
    return _tcmalloc() is not None


def preload_env(environ: dict[str, str] | os._Environ[str]) -> dict[str, str] | None:
    """The environment to restart this process in with tcmalloc preloaded, or None to stay."""
    choice = environ.get(CHOICE, "auto") or "auto"
    if choice not in CHOICES:
        raise UserError(f"{CHOICE}={choice}: must be one of {', '.join(CHOICES)}")
    if choice == "system" or environ.get(RELAUNCHED) or tcmalloc_loaded():
        return None
    lib = _installed_tcmalloc()
    if lib is None:
        if choice == "tcmalloc":
            raise UserError(
                f"{CHOICE}=tcmalloc: no tcmalloc library found on this system; install it "
                "(Debian/Ubuntu: apt-get install libtcmalloc-minimal4) or unset the variable"
            )
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [lib, environ.get("LD_PRELOAD", "")]))
    env[RELAUNCHED] = "1"
    # tcmalloc reports every allocation over 1 GB on stderr (a long row's attention does that)
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(2**62))
    return env


def relaunch_with_tcmalloc() -> None:
    """Replace this process with itself, tcmalloc preloaded, when the system has tcmalloc.

    Only a program's own start may call this (the CLI does, for the commands that train): the
    process image is replaced, same pid and arguments. Returns when there is nothing to do.
    """
    env = preload_env(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:
        return  # stay with glibc: slower over long runs, not wrong


def _tcmalloc_hint() -> str:
    """What to do for tcmalloc's steadier long runs, when training runs under glibc."""
    if os.environ.get(CHOICE, "auto") == "system":
        return ""  # the user chose glibc
    lib = _installed_tcmalloc()
    if lib is None:
        return "; install tcmalloc for steadier speed and memory over long runs (README)"
    # installed but not in this process: a Python caller of tunepilot.run, not the CLI
    return (
        f"; tcmalloc is installed but not loaded: the tunepilot command loads it, or start "
        f"Python with LD_PRELOAD={lib} for steadier speed and memory over long runs"
    )


def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


@contextmanager
def training_memory(device: str) -> Iterator[str]:
    """The host allocator for the training loop; yields what it is, for the log."""
    tcmalloc = _tcmalloc()
    if tcmalloc is not None:
        try:
            yield "tcmalloc (preloaded at start)"
        finally:
            # what training freed goes back to the system for evaluation and export
            tcmalloc.MallocExtension_ReleaseFreeMemory()
        return
    libc = _libc() if device == "cpu" else None
    if libc is None:
        yield "default allocator"
        return
    # what the LR finder and the first evaluation freed is still resident in the heap (glibc
    # returns only its top, and only past a threshold): give it back first, so training starts
    # from what it holds (LoRA benchmark, auto, with the probe then in-process: 10.5 GB peak
    # without this, 4.2 with)
    libc.malloc_trim(0)
    try:
        yield f"glibc, trimmed before and after training{_tcmalloc_hint()}"
    finally:
        libc.malloc_trim(0)
