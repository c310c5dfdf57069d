"""Which numeric precision the forward and backward passes run in.

Master weights and optimizer state always stay fp32; precision here means the autocast dtype.
"""

from __future__ import annotations

from typing import Any

from tunepilot.hardware import Hardware
from tunepilot.plan.decision import AUTO_SOURCE, Decision, given, user


def decide_precision(setting: Any, hw: Hardware) -> tuple[Decision, list[str]]:
    """Returns the decision and any warnings about a user choice that fights the hardware."""
    warnings: list[str] = []
    if given(setting):
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
