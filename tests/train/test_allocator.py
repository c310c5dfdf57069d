"""The heap-reuse setting for CPU training: freed memory stays while training, returns after."""

from __future__ import annotations

import os
import platform

import pytest
import torch

from tunepilot.train.allocator import reuse_freed_memory

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
MB = 2**20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_drop_after_free(size_mb: int = 200) -> float:
    """How much resident memory a freed, fully touched tensor of size_mb gives back, in MB."""
    block = torch.ones(size_mb * MB // 4)
    held = rss()
    del block
    return (held - rss()) / MB


@glibc
def test_freed_memory_is_kept_while_training_and_returned_after():
    assert rss_drop_after_free() > 150  # the default: a big block is unmapped on free
    with reuse_freed_memory("cpu") as said:
        assert "heap reuse" in said
        # kept for the next step's tensors (whether a later block lands in it depends on what
        # was allocated in between: glibc does not promise it, so it is not asserted here)
        assert rss_drop_after_free() < 50
    assert rss_drop_after_free() > 150  # defaults back: big blocks go back to the system


def test_other_devices_keep_the_default_allocator():
    with reuse_freed_memory("cuda") as said:
        assert said.startswith("default allocator")
