"""The host allocator for CPU training: tcmalloc when installed, else glibc trimmed around it."""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import tunepilot
from tunepilot.errors import UserError
from tunepilot.train import allocator
from tunepilot.train.allocator import training_memory

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)


# Run in a fresh process: in the test session an earlier in-process training run leaves large
# free holes in the heap (their pages trimmed), which would blur what is measured here. Each
# measurement frees 360 MB into holes of the heap, once before training starts and once inside.
HOLES = """
import json, os, torch
from tunepilot.train.allocator import training_memory

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def free_into_holes():  # MB that freeing 360 MB handed back by itself
    warm = torch.ones(30 * 2**20 // 4)
    del warm  # a freed 30 MB mapping raises glibc's mmap threshold: 2 MB blocks come from the heap
    blocks = [torch.ones(2**20 // 2) for _ in range(200)]  # 400 MB, as a step's activations
    global keep
    keep = blocks[9::10]  # survivors between the freed blocks: the heap cannot shrink its top
    start = rss()
    del blocks
    return (start - rss()) / 2**20

got = {"freed_before": free_into_holes()}
held = rss()
with training_memory("cpu") as said:
    got["given_back_on_entry"] = (held - rss()) / 2**20
    got["freed_inside"] = free_into_holes()
    held = rss()
got["given_back_after"] = (held - rss()) / 2**20
got["said"] = said
print(json.dumps(got))
"""


@functools.cache
def holes() -> dict:
    env = os.environ | {"PYTHONPATH": str(Path(tunepilot.__file__).parents[1])}
    env.pop("LD_PRELOAD", None)
    done = subprocess.run(
        [sys.executable, "-c", HOLES], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


@glibc
def test_memory_freed_before_training_is_given_back_when_training_starts():
    """The LR finder and the first evaluation free their tensors into holes of the heap, which
    stay resident (glibc gives back only the heap's top); training must not start on top of them."""
    got = holes()
    assert got["said"].startswith("glibc")
    assert got["freed_before"] < 50  # freeing alone kept the 360 MB resident
    assert got["given_back_on_entry"] > 300


@glibc
def test_memory_freed_while_training_is_given_back_after():
    """Evaluation and export run after the loop: what training freed into holes of the heap
    must not stay resident through them."""
    got = holes()
    assert got["freed_inside"] < 50
    assert got["given_back_after"] > 300


def test_other_devices_keep_the_default_allocator():
    with training_memory("cuda") as said:
        assert said.startswith("default allocator")


# -- tcmalloc: the CLI restarts itself with it preloaded when the system has it -----------------


def test_preload_env_prepends_tcmalloc_and_marks_the_restart(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "libtcmalloc_minimal.so.4")
    monkeypatch.setattr(allocator.platform, "system", lambda: "Linux")
    env = allocator.preload_env({"LD_PRELOAD": "libother.so", "KEEP": "1"})
    assert env is not None
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4 libother.so"
    assert env["KEEP"] == "1"
    assert env[allocator.RELAUNCHED] == "1"
    # tcmalloc would print a line for every allocation over 1 GB
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) > 2**40
    # the restarted process (marked) and a user's "system" stay as they are
    assert allocator.preload_env(env) is None
    assert allocator.preload_env({allocator.CHOICE: "system"}) is None


def test_preload_env_without_tcmalloc(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    assert allocator.preload_env({}) is None  # auto without tcmalloc: glibc
    with pytest.raises(UserError, match="TUNEPILOT_ALLOCATOR=tcmalloc: no tcmalloc library"):
        allocator.preload_env({allocator.CHOICE: "tcmalloc"})
    with pytest.raises(UserError, match="TUNEPILOT_ALLOCATOR=jemalloc: must be one of"):
        allocator.preload_env({allocator.CHOICE: "jemalloc"})


@pytest.mark.parametrize(
    ("choice", "installed", "expected"),
    [
        ("auto", None, "install tcmalloc"),
        # a Python caller (tunepilot.run) under glibc with tcmalloc on disk: say how to load it
        ("auto", "libtcmalloc_minimal.so.4", "LD_PRELOAD=libtcmalloc_minimal.so.4"),
        ("system", "libtcmalloc_minimal.so.4", ""),  # the user chose glibc: no advice
    ],
)
def test_the_glibc_fallback_says_how_to_get_tcmalloc(monkeypatch, choice, installed, expected):
    monkeypatch.setenv(allocator.CHOICE, choice)
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: installed)
    monkeypatch.setattr(allocator.platform, "system", lambda: "Linux")
    hint = allocator._tcmalloc_hint()
    assert (expected in hint) if expected else hint == ""
    if installed and expected:
        assert "install tcmalloc" not in hint  # it is installed: installing is not the advice


# A stand-in library for tcmalloc: preloading libm changes nothing, and the restart is visible in
# the environment. The program prints its pid and LD_PRELOAD each time it starts.
RESTART = """
import ctypes.util, os, sys
print("start", os.getpid(), os.environ.get("LD_PRELOAD", ""), file=sys.stderr, flush=True)
from tunepilot import cli
from tunepilot.train import allocator
allocator.find_tcmalloc = lambda: ctypes.util.find_library("m")
allocator.platform.system = lambda: "Linux"
sys.exit(cli.main())
"""


def run_restart(*args: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """RESTART with the CLI arguments; its result and the "start" lines, split."""
    env = os.environ | {"PYTHONPATH": str(Path(tunepilot.__file__).parents[1])}
    env.pop(allocator.CHOICE, None)
    env.pop(allocator.RELAUNCHED, None)
    done = subprocess.run(
        [sys.executable, "-c", RESTART, *args], capture_output=True, text=True, timeout=120, env=env
    )
    return done, [line.split() for line in done.stderr.splitlines() if line.startswith("start")]


@pytest.mark.skipif(platform.system() != "Linux", reason="LD_PRELOAD restart: Linux only")
def test_a_training_command_restarts_itself_once_with_the_library_preloaded(tmp_path):
    missing = tmp_path / "missing.yaml"
    done, starts = run_restart("plan", str(missing))
    assert len(starts) == 2, done.stderr  # restarted exactly once
    assert starts[0][1] == starts[1][1]  # the same process (exec), so signals and torchrun hold
    assert len(starts[0]) == 2 and starts[1][2].startswith("libm")
    # and the restarted process ran the command with its arguments
    assert done.returncode == 2
    assert f"error: {missing}: no such config file" in done.stderr
    # commands that do not train never restart
    done, starts = run_restart("runs", str(tmp_path))
    assert len(starts) == 1, done.stderr


@pytest.mark.skipif(allocator.find_tcmalloc() is None, reason="tcmalloc not installed")
def test_with_tcmalloc_preloaded_training_reports_it_and_gives_memory_back():
    env = allocator.preload_env(
        os.environ | {"PYTHONPATH": str(Path(tunepilot.__file__).parents[1])}
    )
    assert env is not None
    done = subprocess.run(
        [sys.executable, "-c", TCMALLOC_MEASURE],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "large alloc" not in done.stderr  # the report threshold is set
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["loaded"] and got["said"].startswith("tcmalloc")
    # What training freed goes back for evaluation and export: tcmalloc keeps no free pages mapped
    # and the process ends near where it began. Not "RSS fell at the release": tcmalloc's own
    # scavenger may return the span at the `del` already: it did in one CI run, and
    # TCMALLOC_AGGRESSIVE_DECOMMIT=true does it every time. That is fine too.
    assert got["peak"] - got["start"] > 1000, got  # the blocks were really there
    assert got["free_mapped"] < 32, got
    assert got["kept"] < 150, got


TCMALLOC_MEASURE = """
import ctypes, json, os, torch
from tunepilot.train.allocator import training_memory, tcmalloc_loaded

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

start = rss()
with training_memory("cpu") as said:
    blocks = [torch.ones(2**20 // 2) for _ in range(200)]  # 400 MB in 2 MB tensors
    big = torch.ones(2**30 // 4)  # and a 1 GB one: over tcmalloc's report threshold
    peak = rss()
    del blocks, big
free = ctypes.c_size_t()
tcmalloc = ctypes.CDLL(None)
assert tcmalloc.MallocExtension_GetNumericProperty(
    b"tcmalloc.pageheap_free_bytes", ctypes.byref(free))
MB = 2**20
print(json.dumps({"loaded": tcmalloc_loaded(), "said": said, "start": start / MB, "peak": peak / MB,
                  "kept": (rss() - start) / MB, "free_mapped": free.value / MB}))
"""
