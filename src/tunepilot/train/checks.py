"""Post-step sanity checks that catch silent setup bugs after one step instead of one epoch.

The classic trap: LoRA + reentrant gradient checkpointing with frozen embeddings trains nothing,
and the loss curve looks merely "slow". We check that every trainable parameter received a
non-zero gradient and that no frozen parameter moved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tunepilot.errors import RunError
from tunepilot.train import frozen

# elements per piece of a fingerprint: a float64 copy of a whole embedding matrix could push a
# GPU that the plan filled to its budget over the edge at step 0 (32 MB per piece here)
PIECE = 1 << 22


def fingerprint(model: nn.Module) -> dict[str, tuple[float, float]]:
    """Cheap per-tensor summary of the frozen parameters (no copy of the weights); of their
    fp32 originals while bf16 copies stand in for them (train/frozen.py). The sums stay on the
    device until one read at the end: a read per tensor is a host-device sync each on a GPU."""
    names, sums = [], []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                continue
            flat = frozen.original(model, p).detach().reshape(-1)
            last = max(flat.numel() - 1, 1)
            total = torch.zeros(2, dtype=torch.float64, device=flat.device)
            for begin in range(0, flat.numel(), PIECE):
                piece = flat[begin : begin + PIECE].double()
                # weights 1..2 along the tensor: a sum alone misses values that swap places
                ramp = torch.arange(
                    begin, begin + piece.numel(), dtype=torch.float64, device=flat.device
                )
                total += torch.stack([piece.sum(), (piece * ramp.div_(last).add_(1.0)).sum()])
            names.append(name)
            sums.append(total)
    return dict(zip(names, map(tuple, _read(sums)), strict=True))


def _read(values: list[torch.Tensor]) -> list:
    """The values on the host, in one transfer per device instead of one per tensor. An FSDP2
    shard's value is made whole first (a collective: every rank reads at the same point)."""
    if not values:
        return []
    values = [v.full_tensor() if hasattr(v, "full_tensor") else v for v in values]
    if len({v.device for v in values}) == 1:
        return torch.stack(values).tolist()
    return [v.tolist() for v in values]


def nonzero_grads(model: nn.Module) -> set[str]:
    """Names of trainable parameters whose current gradient is non-zero somewhere."""
    named = [
        (name, p.grad)
        for name, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    ]
    flags = _read([grad.ne(0).any() for _, grad in named])
    return {name for (name, _), nonzero in zip(named, flags, strict=True) if nonzero}


def check_connected(model: nn.Module) -> None:
    """After the first backward, every trainable parameter must hold a gradient tensor.

    ``None`` means the parameter is not on the loss's autograd graph at all: the LoRA +
    reentrant-checkpointing trap, or adapters on modules the loss never uses.
    """
    _raise_if_missing(
        [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None],
        "after the first backward pass",
    )


def check_gradients(model: nn.Module, received: set[str], updated: bool) -> None:
    """Every trainable parameter must have had a non-zero gradient by now.

    LoRA initialises B to zero, so A's gradient (which flows through B) stays exactly zero until
    one optimizer step with a non-zero learning rate has moved B; warmup makes the very first
    step's rate zero. The loop therefore checks one step after the first real update
    (``updated``); a run that ends sooner can only hold A to the weaker standard.
    """
    _raise_if_missing(
        [
            name
            for name, p in model.named_parameters()
            if p.requires_grad and name not in received and (updated or "lora_A" not in name)
        ],
        "so far",
    )


def _raise_if_missing(missing: list[str], when: str) -> None:
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise RunError(
            f"{len(missing)} trainable parameters got no gradient {when} ({shown}): "
            "they would never train. Usual causes: reentrant gradient checkpointing "
            "with frozen inputs, or target modules outside the loss path; check "
            "lora.target_modules and train.gradient_checkpointing"
        )


def check_frozen(model: nn.Module, before: dict[str, tuple[float, float]]) -> None:
    after = fingerprint(model)
    moved = [name for name, value in before.items() if after.get(name) != value]
    if moved:
        raise RunError(
            f"{len(moved)} frozen parameters changed during the first step (e.g. "
            f"{moved[0]}): the optimizer is updating weights it should not"
        )


@dataclass
class GradientAudit:
    """The checks above, run at the right moments of the first steps of training."""

    frozen: dict[str, tuple[float, float]]
    received: set[str] = field(default_factory=set)
    check_at: int | None = None  # one step after the first with a non-zero learning rate
    done: bool = False

    @classmethod
    def start(cls, model: nn.Module) -> GradientAudit:
        return cls(fingerprint(model))

    def after_backward(self, model: nn.Module, step: int, lr: float) -> None:
        if step == 1:
            check_connected(model)
        if not self.done:
            self.received |= nonzero_grads(model)
        if self.check_at is None and lr > 0:
            self.check_at = step + 1

    def after_update(self, model: nn.Module, step: int, total_steps: int) -> None:
        if step == 1:
            check_frozen(model, self.frozen)
        if not self.done and step in (self.check_at, total_steps):
            check_gradients(model, self.received, updated=step == self.check_at)
            self.done = True
