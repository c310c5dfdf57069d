"""The only module that touches torch.distributed.

Single-process runs never initialise a process group, and every function here is then the
identity, so the rest of the code calls them unconditionally.

A distributed run is data parallel: every rank holds the whole model (LoRA, under DDP) or a
shard of it (full fine-tunes, under FSDP2), takes a contiguous slice of each global batch, and
the gradients are summed across ranks so that the update is exactly the single-process one.
Rank 0 alone reads and writes the run directory and prints; the others follow its decisions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from tunepilot.data.batching import IGNORE, Batch

T = TypeVar("T")


# -- who am I -----------------------------------------------------------------------------


def launched() -> bool:
    """Started by torchrun with more than one process (torchrun sets these variables)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return int(os.environ.get("RANK", "0")) if launched() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def local_world() -> int:
    """Processes of this job on this machine (they share its CPU cores and memory)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if launched() else 1


def is_main() -> bool:
    return rank() == 0


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """Join the torchrun job for the duration of a command; nothing when run alone.

    NCCL carries the CUDA tensors (gradients, parameters) and gloo the small CPU ones (token
    counts, decisions); on a CPU-only machine gloo carries everything.
    """
    if not launched() or active():
        yield
        return
    backend = "gloo"
    if torch.cuda.is_available():
        gpus_for(local_world())
        torch.cuda.set_device(local_rank())
        backend = "cuda:nccl,cpu:gloo"
    # rank 0 alone writes checkpoints and runs the learning-rate finder while the others wait:
    # allow it half an hour (NCCL's default is 10 minutes) before a wait counts as a hang
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


# -- the data: each rank's slice of the global batch --------------------------------------


def shard(indices: list[T], rank_: int | None = None, world_: int | None = None) -> list[T]:
    """This rank's contiguous slice of a global batch.

    Concatenated in rank order the slices give back the global batch, so N processes train on
    exactly the examples, in exactly the order, of one. When the batch does not divide evenly
    (the last, partial batch of an epoch) the first ``len % world`` ranks take one more.
    """
    r = rank() if rank_ is None else rank_
    w = world() if world_ is None else world_
    base, extra = divmod(len(indices), w)
    start = r * base + min(r, extra)
    return indices[start : start + base + (r < extra)]


def micro_batch_count(global_size: int, micro_batch_size: int, world_: int | None = None) -> int:
    """Micro-batches every rank runs for a global batch: as many as the largest slice needs."""
    w = world() if world_ is None else world_
    largest = -(-global_size // w)
    return -(-largest // micro_batch_size)


def blank(batch: Batch) -> Batch:
    """A copy of ``batch`` that carries no loss: every label masked, no token counted.

    Its forward and backward run like any other (its gradient is exactly zero), which is what a
    rank short of examples needs: DDP and FSDP ranks must run the same number of passes, or their
    collectives wait for each other forever.
    """
    return dataclasses.replace(
        batch,
        labels=torch.full_like(batch.labels, IGNORE),
        supervised_tokens=0,
        real_tokens=0,
        padded_tokens=0,
    )


def even_out(batches: list[Batch], needed: int, spare: Callable[[], Batch]) -> list[Batch]:
    """``batches`` plus blank copies of ``spare()`` up to ``needed`` micro-batches."""
    return batches + [blank(spare()) for _ in range(needed - len(batches))]


# -- agreeing on numbers and decisions ------------------------------------------------------


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sum over all ranks, in float64 (token counts, loss shares); ints stay
    ints."""
    if not active():
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return [type(v)(total) for v, total in zip(values, tensor.tolist(), strict=True)]


def agree_min(value: float) -> float:
    """The minimum of ``value`` over all ranks: probe-based decisions (the micro-batch that
    fits, tokens/s) must come out identical on every rank, and the tightest rank rules."""
    if not active():
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return type(value)(tensor.item())


def all_ranks(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank: for branches that call collectives inside."""
    return bool(agree_min(int(flag)))


def agree_max(value: int) -> int:
    """The maximum of ``value`` over all ranks (e.g. a stop signal any rank received)."""
    return -int(agree_min(-value))


def from_main(fn: Callable[[], T]) -> T:
    """``fn()`` evaluated on rank 0 only; its value, or the exception it raised, on every rank.

    For decisions that read the run directory (other nodes may not even see it) or that would
    differ between ranks if each measured for itself (the learning-rate finder).
    """
    if not active():
        return fn()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except Exception as exc:  # every rank must fail the same way, not wait for rank 0
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def gather_objects(value: T) -> list[T]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not active():
        return [value]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, value)
    return out


def barrier() -> None:
    """Wait until every rank gets here (after rank 0 writes what the others will need)."""
    if active():
        dist.barrier()


# -- the model: DDP for LoRA, FSDP2 for full fine-tunes -------------------------------------


class _Loss(nn.Module):
    """Runs ``fn(model, *args)`` as its forward.

    DDP synchronises the gradients of a backward only when *its* forward ran, and the loss
    calls the decoder and the output head separately (logits only where there are labels), so
    the whole loss computation is what DDP wraps.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        return fn(self.model, *args)


@dataclasses.dataclass
class Replica:
    """How this rank runs forward and backward: alone, under DDP, or under FSDP2."""

    module: nn.Module  # the model; DDP(_Loss(model)) for "ddp"
    strategy: str  # "single" | "ddp" | "fsdp"

    def loss(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        """``fn(model, *args)`` (the loss of a micro-batch), through the wrapper."""
        if self.strategy == "ddp":
            return self.module(fn, *args)
        return fn(self.module, *args)

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces gradients once per step, after the last micro-batch; before it,
        they accumulate locally. FSDP reduce-scatters after every micro-batch instead: holding
        unsharded gradients until the end would cost the memory FSDP is there to save."""
        if self.strategy == "ddp" and not last:
            return self.module.no_sync()
        return contextlib.nullcontext()


def wrap(model: nn.Module, method: str, device: str) -> Replica | None:
    """Prepare ``model`` for data-parallel training; None when running alone.

    LoRA trains a few million parameters: every rank keeps the whole model and DDP all-reduces
    the adapters' gradients. A full fine-tune shards parameters, gradients and optimizer state
    over the ranks with FSDP2, one shard group per decoder layer.

    Call it before building the optimizer: FSDP2 replaces the parameters with sharded ones.
    """
    if not active():
        return None
    if method == "lora":
        return _ddp(model, device)
    return _fsdp(model)


def _sum_hook(_state, bucket):  # unannotated: DDP rejects postponed (string) annotations
    # each rank's loss is already divided by the supervised tokens of the whole step, so the
    # gradient of the step is the sum over ranks; DDP's default hook would average it
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _ddp(model: nn.Module, device: str) -> Replica:
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(
        _Loss(model),
        device_ids=[local_rank()] if device == "cuda" else None,
        broadcast_buffers=False,  # no batch norm: buffers (rotary tables) never change
    )
    ddp.register_comm_hook(None, _sum_hook)
    return Replica(ddp, "ddp")


def _fsdp(model: nn.Module) -> Replica:
    from torch.distributed.fsdp import FSDPModule, fully_shard

    # transformers lists the classes that must not be split (the decoder layers): one shard
    # group each, so only one layer's parameters are ever gathered at a time
    layer_types = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if type(module).__name__ in layer_types:
            fully_shard(module)
    fully_shard(model)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # sum, not average, as for DDP above; plain sums, because gloo has no PREMUL_SUM
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    # transformers' generate() then keeps every rank stepping until all are done (synced_gpus)
    model._is_fsdp_managed_module = True
    return Replica(model, "fsdp")


def sharded(model: nn.Module) -> bool:
    """Whether ``model`` is sharded by FSDP2 (its parameters are DTensors)."""
    if not active():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# -- whole state dicts of a sharded model -----------------------------------------------------


def full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The sharded model's whole weights and optimizer state, on rank 0's CPU.

    Every rank must call it (the shards are gathered); the other ranks get empty dicts. The
    optimizer state is keyed by parameter name, not by position as ``optimizer.state_dict()``.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options) if optimizer else {}
    # one entry per tensor, as model.state_dict() saves it: the gathered copy of a tied output
    # head is no longer the embedding's storage, so transformers would save it twice
    own = {name for name, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in weights.items() if k in own}, optim


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    weights: dict[str, torch.Tensor],
    optim: dict[str, Any],
) -> None:
    """Scatter whole weights and optimizer state held by rank 0 into the shards of every rank.

    The model and the optimizer are set by separate calls: ``set_state_dict`` skips the model
    on ranks whose (empty) model dict looks like "optimizer only", and rank 0 then waits forever.
    ``strict=False`` because checkpoints hold trainable parameters only, once per tied tensor.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, weights if is_main() else {}, options=options)
    set_optimizer_state_dict(model, optimizer, optim if is_main() else {}, options=options)


# -- the launcher -------------------------------------------------------------------------


def gpus_for(processes: int) -> None:
    """Each process of a job trains on its own GPU: more local processes than GPUs is an error
    (NCCL refuses two ranks on one GPU, and torch.cuda.set_device a GPU that is not there)."""
    if not torch.cuda.is_available():
        return
    gpus = torch.cuda.device_count()
    if processes > gpus:
        from tunepilot.errors import UserError

        raise UserError(
            f"--nproc {processes}: this machine has {gpus} CUDA GPU(s) and each process needs "
            f"its own; use --nproc {gpus} or fewer, or hide the GPUs (CUDA_VISIBLE_DEVICES=) "
            "to train with processes on the CPU"
        )


def cores_for(processes: int) -> int:
    """CPU processes each need a core of their own: more only contend for the same cores while
    each holds its own copy of the model (64 processes on a 2-core machine spent minutes
    starting before the rendezvous timed out). Returns the cores each process gets."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    if not torch.cuda.is_available() and processes > cores:
        from tunepilot.errors import UserError

        raise UserError(
            f"--nproc {processes}: this machine has {cores} CPU core(s) and each process on "
            f"the CPU needs one of its own; use --nproc {cores} or fewer (torchrun itself, "
            "if you mean to share cores)"
        )
    return max(1, cores // processes)


def launch_args(nproc: int, args: list[str]) -> list[str]:
    """torchrun's arguments for ``tunepilot ARGS`` on ``nproc`` local processes."""
    return ["--standalone", "--nproc-per-node", str(nproc), "-m", "tunepilot", *args]


def launch(nproc: int, args: list[str]) -> int:
    """``torchrun --standalone --nproc-per-node N -m tunepilot ARGS`` on this machine.

    Runs torchrun's launcher in this process so that its exit code can be the first failed
    worker's (torchrun itself exits 1 for any failure), keeping 2 (bad input), 3 (run error)
    and 130/143 (signals) meaningful. ``--standalone`` picks a free port.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    gpus_for(nproc)  # before any worker starts
    # torchrun would force one thread per process (with a warning): split the cores instead
    os.environ.setdefault("OMP_NUM_THREADS", str(cores_for(nproc)))
    try:
        run(parse_args(launch_args(nproc, args)))
    except ChildFailedError as exc:
        failed_rank, failure = exc.get_first_failure()
        code = failure.exitcode
        if code < 0:  # killed by a signal: report it the way a shell would
            code = 128 - code
        if code not in (2, 3, 130, 143):
            print(f"error: rank {failed_rank} exited with code {code}", file=sys.stderr)
        return code
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0
