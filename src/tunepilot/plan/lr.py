"""Peak learning rate."""

from __future__ import annotations

from typing import Any

from tunepilot.plan.decision import AUTO_SOURCE, Decision, given, user


def decide_learning_rate(setting: Any, method: str, total_params: int) -> Decision:
    """Spine rule by method and size; the autopilot issue adds batch scaling and a finder."""
    if given(setting):
        return user(setting)
    if method == "lora":
        return Decision(
            2e-4,
            AUTO_SOURCE,
            "LoRA: 2e-4, the value the LoRA and QLoRA papers and "
            "most recipes converge on (adapters start at zero and need a large step)",
        )
    if total_params >= 1_000_000_000:
        return Decision(
            1e-5,
            AUTO_SOURCE,
            "full fine-tune of a >=1B model: 1e-5 keeps the pretrained weights from drifting",
        )
    return Decision(5e-5, AUTO_SOURCE, "full fine-tune of a small model: 5e-5")
