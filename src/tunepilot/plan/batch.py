"""Micro-batch, global batch and gradient accumulation.

``global_batch_size`` is the batch the optimizer sees and the knob users reason about; the
micro-batch is whatever fits the device, and accumulation is derived so that the global batch
never changes when the micro-batch does. With N training processes each takes 1/N of the
global batch: global = micro-batch x accumulation x N.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tunepilot.errors import UserError
from tunepilot.hardware import Hardware
from tunepilot.plan.decision import AUTO_SOURCE, Decision, given, user
from tunepilot.plan.memory import ModelShape, estimate
from tunepilot.plan.probe import ProbePoint, Search, search_micro_batch

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
            f"~{need:.2f} GB, over the {budget:.2f} GB budget; lower train.max_length, "
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


def decide_global_batch(
    setting: Any, n_train: int, epochs: float | None, processes: int = 1
) -> Decision:
    """The batch the optimizer sees, chosen from the data size (not from memory)."""
    if given(setting):
        if setting % processes:
            raise UserError(
                f"train.global_batch_size: {setting} cannot be split evenly over "
                f"{processes} processes; use a multiple of {processes}"
            )
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
    if seen / target < 100:  # 8 is the floor: smaller batches are noisy and slow per example
        steps = max(1, -(-int(seen) // target))
        why = (
            f"{target}, the smallest chosen: {n_train:,} examples x {epochs or 1:g} epochs make "
            f"only ~{steps} optimizer steps at it, fewer than the ~100 a fine-tune wants; "
            "more data would help"
        )
    if target % processes:
        target = -(-target // processes) * processes
        why += f", rounded up to {target} to split evenly over {processes} processes"
    return Decision(target, AUTO_SOURCE, why)


def decide_accumulation(
    setting: Any, global_batch: int, micro_batch: int, processes: int = 1
) -> Decision:
    per_process = micro_batch * processes
    across = f" x {processes} processes" if processes > 1 else ""
    if global_batch % per_process:
        raise UserError(
            f"train.global_batch_size: {global_batch} is not a multiple of the "
            f"micro-batch {micro_batch}{across}"
        )
    value = global_batch // per_process
    if given(setting):
        if setting != value:  # the config checks this for one process only
            raise UserError(
                f"train.gradient_accumulation_steps: {setting} x micro-batch {micro_batch}"
                f"{across} is not the global batch {global_batch}; leave it auto"
            )
        return user(setting)
    return Decision(
        value,
        AUTO_SOURCE,
        f"global batch {global_batch} / "
        + (f"(micro-batch {micro_batch}{across})" if across else f"micro-batch {micro_batch}")
        + f": the optimizer always sees {global_batch} examples",
    )


# How far bf16's probe loss may sit from fp32's. The probe batch is random tokens, where the
# model is confidently wrong (loss ~13 for SmolLM2-135M) and bf16 rounding of large logits
# moves the loss by ~3% (measured: 13.03 vs 13.43), while on real text the two agree to ~1e-3
# (benchmarks/compare.py). Broken bf16 kernels give NaN, 0 or wildly different losses; a 2%
# bound also rejected healthy bf16 and sent a full fine-tune to fp32 at 0.7x the speed.
BF16_LOSS_TOLERANCE = 0.10
PRECISION_TOKENS = 2048  # tokens per probe step for the CPU bf16-vs-fp32 comparison

#: (micro_batch, max_length, precision, checkpointing) -> a measured ProbePoint
Measure = Callable[[int, int, str, bool], ProbePoint]


def decide_by_probe(
    t: Any,
    hw: Hardware,
    precision_rule: Decision,
    global_batch: int,
    n_train: int,
    max_length: int,
    measure: Measure,
    deadline: float,
) -> tuple[Decision, Decision, Decision, list[ProbePoint]]:
    """Precision (CPU bf16 only), micro-batch and checkpointing, decided from measurements.

    Returns (precision, micro_batch_size, gradient_checkpointing, every point measured).
    """
    seen: list[ProbePoint] = []

    def run(micro: int, prec: str, ckpt: bool) -> ProbePoint:
        point = measure(micro, max_length, prec, ckpt)
        if point not in seen:  # the precision probe's point is reused by the size search
            seen.append(point)
        return point

    cap = CPU_CAP if hw.device == "cpu" else GPU_CAP
    sizes = [
        s
        for s in CANDIDATES
        if s <= min(cap, global_batch, max(1, n_train)) and global_batch % s == 0
    ]
    if given(t.micro_batch_size):
        sizes = [t.micro_batch_size]
    ckpt = t.gradient_checkpointing if given(t.gradient_checkpointing) else False
    prec = precision_rule
    if not given(t.precision) and hw.device == "cpu" and hw.bf16:
        # compared on ~2k tokens: enough for the matmuls to show bf16's gain, and cheap when
        # max_length is long (8 x 1024 tokens in fp32 took ~55 s a step and ~20 GB for 135M)
        small = [s for s in sizes if s <= 8] or sizes[:1]
        start = next((s for s in small if s * max_length >= PRECISION_TOKENS), small[-1])
        # and where both fit: fp32 can overflow the budget where bf16 does not
        for m0 in sorted([s for s in small if s <= start], reverse=True):
            fp32, bf16 = run(m0, "fp32", ckpt), run(m0, "bf16", ckpt)
            if fp32.fits or not bf16.fits:
                break
        prec = _cpu_precision(fp32, bf16)
    search = search_micro_batch(lambda m: run(m, prec.value, ckpt), sizes, deadline)
    ckpt_reason = (
        "set in the config"
        if given(t.gradient_checkpointing)
        else "not needed: the chosen micro-batch fits without recomputation"
    )
    if search.best is None and not given(t.gradient_checkpointing):
        ckpt = True
        search = search_micro_batch(lambda m: run(m, prec.value, True), sizes, deadline)
        ckpt_reason = "needed: no micro-batch fits the memory budget without it"
    best = search.best
    if best is None:
        raise UserError(
            f"train.memory_budget_gb: not even {sizes[0]} example(s) of "
            f"{max_length} tokens fit "
            "the memory budget; raise the budget, lower train.max_length, enable "
            "train.gradient_checkpointing or use method: lora"
        )
    fitting = sorted({p.micro_batch for p in seen if p.fits and p.precision == prec.value})
    failed = sorted({p.micro_batch for p in seen if not p.fits})
    micro = Decision(
        best.micro_batch,
        "user" if given(t.micro_batch_size) else AUTO_SOURCE,
        f"measured fastest: {best.tokens_per_s:.0f} tokens/s at {best.peak_gb:.1f} "
        f"GB peak; fitted {fitting}"
        + (f", did not fit {failed}" if failed else "")
        + _not_tried(search),
    )
    source = "user" if given(t.gradient_checkpointing) else AUTO_SOURCE
    return prec, micro, Decision(ckpt, source, ckpt_reason), seen


def _not_tried(search: Search) -> str:
    if search.not_tried is None:
        return ""
    return (
        f"; {search.not_tried} not tried: its trial would take ~"
        f"{search.not_tried_seconds:.0f} s, past train.probe_seconds"
    )


def _cpu_precision(fp32: ProbePoint, bf16: ProbePoint) -> Decision:
    """bf16 on a CPU only when measured faster *and* its loss agrees with fp32's."""
    if bf16.fits and not fp32.fits:
        return Decision(
            "bf16",
            AUTO_SOURCE,
            f"fp32 does not fit the memory budget even at micro-batch {fp32.micro_batch} "
            f"({fp32.peak_gb:.1f} GB); bf16 autocast does ({bf16.peak_gb:.1f} GB, "
            f"{bf16.tokens_per_s:.0f} tokens/s); master weights stay fp32",
        )
    if not bf16.fits:
        return Decision("fp32", AUTO_SOURCE, "the bf16 probe did not fit: fp32")
    speedup = bf16.tokens_per_s / max(fp32.tokens_per_s, 1e-9)
    agree = abs(bf16.loss - fp32.loss) <= BF16_LOSS_TOLERANCE * abs(fp32.loss) + 1e-3
    measured = (
        f"measured at micro-batch {fp32.micro_batch}: bf16 {bf16.tokens_per_s:.0f} vs "
        f"fp32 {fp32.tokens_per_s:.0f} tokens/s, loss {bf16.loss:.4f} vs "
        f"{fp32.loss:.4f}"
    )
    if speedup >= 1.05 and agree:
        return Decision(
            "bf16",
            AUTO_SOURCE,
            f"CPU bf16 autocast is {speedup:.2f}x faster and "
            f"its loss agrees ({measured}); master weights stay fp32",
        )
    why = "not faster" if speedup < 1.05 else "loss disagrees"
    return Decision("fp32", AUTO_SOURCE, f"CPU bf16 {why} ({measured}): fp32")
