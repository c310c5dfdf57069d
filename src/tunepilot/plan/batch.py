"""Micro-batch, global batch and gradient accumulation.

``global_batch_size`` is the batch the optimizer sees and the knob users reason about; the
micro-batch is whatever fits the device, and accumulation is derived so that the global batch
never changes when the micro-batch does.
"""

from __future__ import annotations

from typing import Any

from tunepilot.errors import UserError
from tunepilot.hardware import Hardware
from tunepilot.plan.decision import AUTO_SOURCE, Decision, given, user
from tunepilot.plan.memory import ModelShape, estimate

#: hardware-friendly sizes: powers of two below 8, multiples of 8 above
CANDIDATES = (1, 2, 4, 8, 16, 24, 32, 48, 64)
CPU_CAP = 16  # beyond this a 2-16 core CPU gains no throughput, only latency per step
GPU_CAP = 64


def decide_micro_batch(
    setting: Any,
    hw: Hardware,
    shape: ModelShape,
    max_length: int,
    precision: str,
    checkpointing: bool,
    budget: float,
    n_train: int,
    global_batch: int | None,
) -> Decision:
    """Largest hardware-friendly micro-batch that fits memory and divides the global batch."""
    if given(setting):
        return user(setting)
    cap = CPU_CAP if hw.device == "cpu" else GPU_CAP
    if global_batch:
        cap = min(cap, global_batch)
    fitting = [
        b
        for b in CANDIDATES
        if b <= cap
        and b <= max(1, n_train)
        and estimate(shape, b, max_length, precision, checkpointing).total_gb <= budget
    ]
    if not fitting:
        need = estimate(shape, 1, max_length, precision, checkpointing).total_gb
        raise UserError(
            f"train.micro_batch_size: even 1 example of {max_length} tokens needs "
            f"~{need:.1f} GB, over the {budget:.1f} GB budget; lower train.max_length, "
            "use method: lora, or enable train.gradient_checkpointing"
        )
    # global batch must stay a multiple of the micro-batch
    if global_batch:
        fitting = [b for b in fitting if global_batch % b == 0] or [1]
    best = fitting[-1]
    est = estimate(shape, best, max_length, precision, checkpointing).total_gb
    limit = "the device" if best < cap else f"the {hw.device.upper()} cap of {cap}"
    return Decision(
        best,
        AUTO_SOURCE,
        f"largest hardware-friendly size that fits "
        f"(est. {est:.1f} of {budget:.1f} GB at {max_length} tokens), bounded by "
        f"{limit}",
    )


def decide_global_batch(setting: Any, n_train: int, epochs: float | None) -> Decision:
    """The batch the optimizer sees, chosen from the data size (not from memory)."""
    if given(setting):
        return user(setting)
    target, why = 16, "16, a common fine-tuning batch"
    if n_train > 100_000:
        target, why = 64, "64 for a large dataset (>100k examples): less gradient noise"
    elif n_train > 20_000:
        target, why = 32, "32 for a mid-sized dataset (>20k examples)"
    seen = n_train * (epochs or 1)
    while target > 8 and seen / target < 100:
        target //= 2
        why = f"{target}, so that training gets at least ~100 optimizer steps"
    return Decision(target, AUTO_SOURCE, why)


def decide_accumulation(setting: Any, global_batch: int, micro_batch: int) -> Decision:
    if global_batch % micro_batch:
        raise UserError(
            f"train.global_batch_size: {global_batch} is not a multiple of the "
            f"micro-batch {micro_batch}"
        )
    value = global_batch // micro_batch
    if given(setting):
        return user(setting)
    return Decision(
        value,
        AUTO_SOURCE,
        f"global batch {global_batch} / micro-batch "
        f"{micro_batch}: the optimizer always sees {global_batch} examples",
    )
