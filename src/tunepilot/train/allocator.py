"""Host memory for CPU training: keep freed blocks for reuse instead of handing them back.

glibc's malloc serves every allocation above 32 MB (and, once its threshold has adapted, many
smaller ones) with a fresh ``mmap`` and returns it with ``munmap`` when freed. A training step
frees and re-allocates the same big tensors every step (a 49k-vocabulary weight gradient is
113 MB), so each step page-faults hundreds of megabytes of fresh zeroed pages back in. Measured
on the 2-core benchmark machine (SmolLM2-135M, packed bf16 steps): the full fine-tune ran 22-28%
faster and LoRA 7-10% faster with the settings below, at the same peak RSS (5.18 vs 5.11 GB).
A heap can fragment where mmap cannot (a small object left inside a freed block keeps the next
big one out of it), so peak RSS was watched over 67 steps: 5.46 GB against 5.38 GB with the
default, flat after the first dozen steps, at +10-15% tokens/s (after the other speed fixes).

The settings make malloc take everything from its heap and never shrink it while training, so
freed memory is reused; afterwards the defaults come back and the heap is trimmed, so the
memory returns to the system for evaluation and export. It is trimmed on the way in too: what
ran before training (the batch probe above all) leaves freed memory resident otherwise. The
heap's address space stays: its free holes have no pages until used again, and a later big
block that lands in one (rather than in a fresh mmap) stays resident after it is freed, until
the process ends. Only glibc has ``mallopt``; elsewhere (musl, macOS) this does nothing and says so.

Over a long run glibc's heap fragments anyway: every step brings packed rows of new lengths, so
new tensor sizes and new cached oneDNN kernels, and the kernels (small, long-lived) land in the
holes between the big blocks (80 steps of the full bf16 benchmark job: the heap grew to 4-5x
its allocated part). tcmalloc keeps small objects apart from big spans. Measured through the
CLI (benchmarks/long_run.py, 80 steps, 2 rounds): 349-381 tokens/s against 315-344 with glibc
over every 20-step range, peak RSS flat at 5.3 GB against 6.5 GB. So the CLI restarts itself
with tcmalloc preloaded when the system has it (``relaunch_with_tcmalloc``); the glibc settings
above are the fallback.
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

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

# glibc's documented defaults, restored after training
DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_TOP_PAD: 128 * 1024, M_MMAP_MAX: 65536}
TRAINING = {
    M_MMAP_MAX: 0,  # no mmap: every block comes from the heap, where a freed block is reused
    M_TRIM_THRESHOLD: 2**31 - 1,  # never give the heap's top back while training
    M_TOP_PAD: 64 * 2**20,  # grow the heap 64 MB at a time: fewer brk calls
}


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
    lib = find_tcmalloc() if platform.system() == "Linux" else None
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
    lib = find_tcmalloc() if platform.system() == "Linux" else None
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


def _set(libc: ctypes.CDLL, settings: dict[int, int]) -> bool:
    return all(libc.mallopt(key, value) == 1 for key, value in settings.items())


@contextmanager
def reuse_freed_memory(device: str) -> Iterator[str]:
    """While inside, CPU training reuses freed host memory; yields what was done, for the log."""
    tcmalloc = _tcmalloc()
    if tcmalloc is not None:
        try:
            yield "tcmalloc (preloaded at start)"
        finally:
            tcmalloc.MallocExtension_ReleaseFreeMemory()  # for evaluation and export, as below
        return
    libc = _libc() if device == "cpu" else None
    if libc is None:
        yield "default allocator (heap reuse applies to CPU training with glibc only)"
        return
    # what the batch probe, the LR finder and the first evaluation freed is still resident in
    # the heap (glibc returns only its top, and only past a threshold): give it back first, so
    # training starts from what it holds (LoRA benchmark, auto: 10.5 GB peak without, 4.2 with)
    libc.malloc_trim(0)
    if not _set(libc, TRAINING):
        _set(libc, DEFAULTS)
        yield "default allocator (glibc refused the heap-reuse settings)"
        return
    try:
        yield f"glibc heap reuse (no mmap, no trimming) while training{_tcmalloc_hint()}"
    finally:
        _set(libc, DEFAULTS)
        libc.malloc_trim(0)
