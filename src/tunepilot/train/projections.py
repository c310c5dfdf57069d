"""Linear layers that read the same input tensor run as one matmul.

A decoder layer projects one normalised input three times (query, key, value) and another twice
(the feed-forward's gate and up); under LoRA each of those layers also has an A matrix reading
the same input. Computed one by one, each projection is its own matmul, its own cast of the
input to the autocast dtype, and backward its own input-gradient matmul, cast back and sum.
Computed together, over the members' weights concatenated, it is one of each; wider matmuls
also run closer to the peak (benchmark CPU, T=1,300, forward + both backward matmuls: gate+up
39.2 vs 46.9 ms in fp32, 7.9 vs 9.1 ms in bf16; q+k+v 12.5 vs 15.0 ms in fp32).

Which layers share an input is not guessed from names: one small forward (``share_inputs``)
records the input tensor every ``nn.Linear`` receives, in call order, and layers that received
the same tensor form a group. The first member called computes the whole group and keeps the
other members' slices for them; each later member returns its slice only if it is called with
that very tensor (identity, not equality), else it computes alone, so a different call order or
input costs time, never correctness. The weights are concatenated on every forward (cast to the
autocast dtype first), never cached: optimizers and adapter merges change weights in place
without telling anyone (fused AdamW does not even bump the version counter). Two exceptions:
frozen weights that frozen.match casts to bf16 it lays out as consecutive rows of one buffer,
which the matmul reads as they lie (no copy at all); and inside ``weights_fixed()`` (an
evaluation, where no optimizer runs) forwards without gradients join once and reuse the copy.
Only ``forward`` changes (an instance attribute): parameters, state dicts, checkpoints and
exports are untouched.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from tunepilot.train import matmul


@dataclass(eq=False)
class _Group:
    members: list[nn.Linear]
    # (the shared input, every member's output, members yet to take theirs)
    pending: tuple[torch.Tensor, tuple[torch.Tensor, ...], set[int]] | None = field(
        default=None, repr=False
    )


# while weights_fixed() runs: (device type, dtype, group) -> its joined weight and bias
_fixed: dict[tuple[str, torch.dtype | None, _Group], tuple] | None = None


@contextlib.contextmanager
def weights_fixed() -> Iterator[None]:
    """While nothing changes the weights (an evaluation, a generation), each group's trainable
    weights are cast and joined once, not at every forward: in generation that is every token,
    and a full fine-tune's generation of 64 demo prompts took 9.9-11.3 s joining at every token
    against 8.0-8.8 s joining once (bf16, Zen 5). Forwards with gradients never use the copy.

    The copy is the autocast-dtype size of the grouped weights (two thirds of a decoder's); the
    evaluations run between optimizer steps, whose gradients (fp32, the whole model) are freed
    by then. Frozen weights need none: frozen.match lays them out to be read in place."""
    global _fixed
    if _fixed is not None:  # nested: the outer one owns the copies
        yield
        return
    _fixed = {}
    try:
        yield
    finally:
        _fixed = None


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    group, index = self._tunepilot_group
    pending = group.pending
    if index > 0 and pending is not None and pending[0] is x and index in pending[2]:
        pending[2].discard(index)
        if not pending[2]:
            group.pending = None
        return pending[1][index]
    group.pending = None
    weight, bias = _joined_once(group, x.device.type)
    if weight is None:
        return matmul.linear(x, self.weight, self.bias)
    outputs = matmul.linear(x, weight, bias).split([m.out_features for m in group.members], dim=-1)
    others = set(range(len(group.members))) - {index}
    if others:
        group.pending = (x, outputs, others)
    return outputs[index]


def _joined_once(group: _Group, device: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``_joined``, kept for the rest of ``weights_fixed()`` where that runs without gradients."""
    if _fixed is None or torch.is_grad_enabled() or not group.members[0].weight.requires_grad:
        return _joined(group.members, device)
    key = (device, _matmul_dtype(device), group)
    if key not in _fixed:
        _fixed[key] = _joined(group.members, device)
    return _fixed[key]


def _matmul_dtype(device: str) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on ``device``; None outside autocast."""
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _joined(
    members: list[nn.Linear], device: str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The members' weights (and biases) stacked, in the dtype the matmul will run in; None
    where they cannot be: different dtypes outside autocast, or trainable and frozen weights
    together (the frozen ones' weight gradient would be computed for nothing)."""
    if len({m.weight.requires_grad for m in members}) > 1:
        return None, None
    dtype = _matmul_dtype(device)
    weights = [m.weight if dtype is None else m.weight.to(dtype) for m in members]
    if len({w.dtype for w in weights}) > 1:
        return None, None
    weight = _rows_of_one_buffer(weights)
    if weight is None:
        weight = torch.cat(weights)
    biases = [m.bias for m in members]
    if all(b is None for b in biases):
        return weight, None
    return weight, torch.cat([b.to(weights[0].dtype) for b in biases])


def _rows_of_one_buffer(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """The weights as one tensor without a copy, where they already are consecutive rows of one
    buffer (frozen.match lays out a group's frozen weights so); None otherwise. Never for a
    weight that needs a gradient: autograd must see each parameter used, not a view across
    several."""
    first = weights[0]
    if first.requires_grad or type(first) not in (torch.Tensor, nn.Parameter) or first.dim() != 2:
        return None  # a DTensor or other subclass: its storage is not the whole story
    columns = first.shape[1]
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for w in weights:
        if (
            w.requires_grad
            or type(w) is not type(first)
            or w.dtype != first.dtype
            or w.untyped_storage().data_ptr() != storage
            or w.storage_offset() != offset
            or w.stride() != (columns, 1)
        ):
            return None
        offset += w.numel()
    rows = (offset - first.storage_offset()) // columns
    return first.as_strided((rows, columns), (columns, 1), first.storage_offset())


def share_inputs(model: nn.Module, input_ids: torch.Tensor) -> int:
    """Group the ``nn.Linear`` layers of ``model`` that read the same input; returns how many
    layers were grouped. ``input_ids``: a few tokens for the recording forward, run in training
    mode (dropout gives each adapter its own input there, so those are not grouped)."""
    unshare(model)
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    calls: list[tuple[torch.Tensor, nn.Linear]] = []  # the inputs kept alive: ids stay unique
    handles = [
        m.register_forward_pre_hook(lambda module, args: calls.append((args[0], module)))
        for m in linears
    ]
    training = model.training
    try:
        # fork_rng: the recording forward's dropout must not move the run's random stream
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.train()
            model(input_ids=input_ids, use_cache=False)
    except Exception:  # a model this forward does not fit: every layer computes alone
        return 0
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    # trainable and frozen layers apart: LoRA's A matrices read what the frozen layers read
    by_input: dict[tuple[int, bool], list[nn.Linear]] = {}
    for x, module in calls:
        members = by_input.setdefault((id(x), module.weight.requires_grad), [])
        if module not in members:
            members.append(module)
    grouped = 0
    for members in by_input.values():
        if len(members) < 2 or len({m.bias is None for m in members}) > 1:
            continue
        group = _Group(members)
        for index, module in enumerate(members):
            module._tunepilot_group = (group, index)
            module.forward = types.MethodType(_forward, module)
        grouped += len(members)
    return grouped


def groups(model: nn.Module) -> list[list[nn.Linear]]:
    """The groups of layers in ``model`` that run as one matmul, each in its members' order."""
    found: dict[int, list[nn.Linear]] = {}
    for module in model.modules():
        if "_tunepilot_group" in vars(module):
            group = module._tunepilot_group[0]
            found.setdefault(id(group), group.members)
    return list(found.values())


def shared(model: nn.Module) -> tuple[int, int]:
    """(layers in a group, groups) in ``model``."""
    found = groups(model)
    return sum(len(members) for members in found), len(found)


def unshare(modules: nn.Module | list[nn.Module]) -> None:
    """Every layer in ``modules`` (and below), and the rest of its group, computes alone again."""
    roots = modules if isinstance(modules, list) else [modules]
    for root in roots:
        for module in root.modules():
            if "_tunepilot_group" in vars(module):
                for member in module._tunepilot_group[0].members:
                    vars(member).pop("_tunepilot_group", None)
                    vars(member).pop("forward", None)
