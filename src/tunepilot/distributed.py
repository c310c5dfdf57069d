"""The only module that touches torch.distributed.

Single-process runs never initialise a process group, and every function here is then the
identity, so the rest of the code calls them unconditionally.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def agree_min(value: float) -> float:
    """The minimum of ``value`` over all ranks: probe-based decisions (the micro-batch that
    fits, tokens/s) must come out identical on every rank, and the tightest rank rules."""
    if not active():
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return type(value)(tensor.item())
