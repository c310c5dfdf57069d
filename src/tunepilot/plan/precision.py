"""Which numeric precision the forward and backward passes run in.

Master weights and optimizer state always stay fp32; precision here means the autocast dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tunepilot import distributed, hardware
from tunepilot.errors import UserError
from tunepilot.hardware import Hardware
from tunepilot.plan.decision import AUTO_SOURCE, Decision, given, user
from tunepilot.train.step import DTYPES

# a requested precision whose layers train this many times slower than fp32 is refused. fp16 on
# a CPU without half-precision kernels (an EPYC with avx512_bf16): a layer 13x slower, a whole
# SmolLM2-135M step 25x (43 s against 1.7 s), and the batch probe silent for many minutes
REFUSED_SLOWDOWN = 4.0


def decide_precision(
    setting: Any, hw: Hardware, speed: Callable[[Any], float] | None = None
) -> tuple[Decision, list[str]]:
    """Returns the decision and any warnings about a user choice that fights the hardware.
    ``speed`` times a layer at a dtype (hardware.cpu_layer_gflops; tests pass their own)."""
    warnings: list[str] = []
    if given(setting):
        if hw.device == "cpu" and (setting == "fp16" or (setting == "bf16" and not hw.bf16)):
            refuse_if_slow(setting, hw, speed or hardware.cpu_layer_gflops)
        if setting == "bf16" and not hw.bf16:
            warnings.append(
                f"precision bf16 requested but {hw.bf16_reason}: it will be emulated "
                "and slow; fp32 (or fp16 on older GPUs) is faster"
            )
        if setting == "fp16" and hw.device == "cpu":
            warnings.append(
                "precision fp16 on a CPU is slow and needs loss scaling; prefer bf16 "
                "(if supported) or fp32"
            )
        return user(setting), warnings
    if hw.device == "cuda":
        if hw.bf16:
            return Decision(
                "bf16",
                AUTO_SOURCE,
                f"GPU {hw.bf16_reason}: bf16 has fp32's range "
                "(no loss scaling, no overflow) at half the memory traffic",
            ), warnings
        return Decision(
            "fp16",
            AUTO_SOURCE,
            f"GPU {hw.bf16_reason}, so no native bf16; fp16 "
            "with dynamic loss scaling, fp32 master weights",
        ), warnings
    if hw.bf16:
        return Decision(
            "bf16",
            AUTO_SOURCE,
            f"{hw.bf16_reason}: bf16 matmuls run about 2x fp32 "
            "here; fp32 master weights and fp32 loss keep it stable",
        ), warnings
    return Decision(
        "fp32", AUTO_SOURCE, f"{hw.bf16_reason} and fp16 on a CPU is slow: fp32"
    ), warnings


def refuse_if_slow(setting: str, hw: Hardware, speed: Callable[[Any], float]) -> None:
    """A half precision this CPU only emulates: time it against fp32 before a run (and the
    batch probe, three steps per trial) spends hours at it without a word."""
    low, fp32 = speed(DTYPES[setting]), speed(DTYPES["fp32"])
    # every process of a distributed CPU run must reach the same verdict: the slowest rules
    slowdown = -distributed.agree_min(-fp32 / max(low, 1e-9))
    if slowdown < REFUSED_SLOWDOWN:
        return
    better = "bf16 (native on this CPU), fp32" if hw.bf16 else "fp32"
    raise UserError(
        f"train.precision: {setting} on this CPU trains {slowdown:.0f}x slower than fp32 or "
        f"worse (measured on a layer's forward and backward: {low:.0f} vs {fp32:.0f} GFLOP/s); "
        f"set train.precision to {better} or auto"
    )
