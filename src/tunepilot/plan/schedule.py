"""Learning-rate schedule and warmup (by steps or by ratio; the plan says which)."""

from __future__ import annotations

import math
from typing import Any

from tunepilot.plan.decision import AUTO_SOURCE, Decision, given, user

AUTO_WARMUP_RATIO = 0.05


def decide_scheduler(setting: Any) -> Decision:
    if given(setting):
        return user(setting)
    return Decision(
        "cosine",
        AUTO_SOURCE,
        "cosine decay to zero: large steps early, small "
        "careful ones at the end; the usual choice in LLM fine-tuning recipes",
    )


def decide_warmup(
    steps_setting: Any, ratio_setting: Any, total_steps: int
) -> tuple[Decision, list[str]]:
    warnings = []
    if given(steps_setting):
        decision = user(
            steps_setting, f"set in the config as steps ({steps_setting} of {total_steps})"
        )
    elif given(ratio_setting):
        steps = math.ceil(ratio_setting * total_steps)
        decision = Decision(
            steps, "user", f"warmup_ratio {ratio_setting:g} x {total_steps} total steps, rounded up"
        )
    else:
        steps = math.ceil(AUTO_WARMUP_RATIO * total_steps) if total_steps >= 10 else 0
        decision = Decision(
            steps,
            AUTO_SOURCE,
            f"ratio {AUTO_WARMUP_RATIO:g} of {total_steps} "
            "steps: lets AdamW's moment estimates settle before full-size steps"
            if steps
            else "run too short (<10 steps) to spend any on warmup",
        )
    if decision.value >= total_steps:
        warnings.append(
            f"warmup ({decision.value} steps) >= total steps ({total_steps}): the "
            "learning rate never reaches its peak; lower warmup"
        )
    return decision, warnings
