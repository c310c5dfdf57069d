"""What the device says when memory runs out, read the same way by the probe and the loop."""

from __future__ import annotations

import pytest
import torch

from tunepilot.hardware import cpu_layer_gflops, fail_allocation, out_of_memory


def test_a_failed_cpu_allocation_reads_as_out_of_memory():
    with pytest.raises(RuntimeError) as caught:
        fail_allocation("cpu")
    # torch gives the CPU's failure no type of its own, which is why its text is read
    assert not isinstance(caught.value, torch.OutOfMemoryError)
    assert out_of_memory(caught.value)


def test_only_allocation_failures_read_as_out_of_memory():
    assert out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4 EiB"))
    assert not out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not out_of_memory(ValueError("DefaultCPUAllocator: can't allocate memory"))


def test_layer_timer_leaves_the_global_rng_alone():
    """The precision check times layers before training seeds anything; a timer that drew from
    the global RNG would make a run's initialisation depend on whether it was checked."""
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    speeds = [cpu_layer_gflops(d, size=64) for d in (torch.float32, torch.bfloat16)]
    assert torch.equal(torch.rand(3), expected)
    assert all(s > 0 for s in speeds)
