"""Peak learning rate."""

from __future__ import annotations

import math
from typing import Any

from tunepilot.plan.decision import AUTO_SOURCE, Decision, given, user

#: the global batch the base rates below are quoted at (typical of the recipes they come from)
REFERENCE_BATCH = 16
#: the hidden size LoRA's 2e-4 is quoted at: the 4,096-wide 7-8B models of the LoRA/QLoRA
#: papers and most recipes
REFERENCE_WIDTH = 4096
#: LoRA's best rate grows as models narrow, as width^-0.781: the exponent Thinking Machines
#: fitted for Llama-family LoRA from 1B to 70B ("LoRA Without Regret", 2025; tinker-cookbook's
#: hyperparam_utils.get_lr). On the demo (SmolLM2-135M, 576 wide, global batch 8, 160 steps)
#: the unscaled 1.41e-4 reached 47/120 exact, 2x 64/120, 4x 114/120, 8x 119/120, 16x 120/120
#: (session 24); this rule's 4.6x is the published fit, not that easy task's optimum
WIDTH_EXPONENT = 0.781
#: narrower models (test-sized ones) are scaled as if this wide, just under the narrowest
#: measured (576): the fit is no evidence for a 16-wide model's 76x
NARROWEST = 512


def base_rate(method: str, total_params: int, hidden_size: int) -> tuple[float, str]:
    if method == "lora":
        scaled = max(hidden_size, NARROWEST)
        width = (REFERENCE_WIDTH / scaled) ** WIDTH_EXPONENT
        if abs(width - 1) < 0.05:
            return 2e-4, "LoRA base 2e-4 (the LoRA/QLoRA papers' and most recipes' value)"
        rate = float(f"{2e-4 * width:.3g}")
        model = (
            f"this {hidden_size:,}-wide model"
            if scaled == hidden_size
            else f"this {hidden_size:,}-wide model, scaled as if {NARROWEST} wide, the narrowest "
            "the rule trusts"
        )
        return rate, (
            f"LoRA 2e-4 (the LoRA/QLoRA papers' value for {REFERENCE_WIDTH:,}-wide models) "
            f"x ({REFERENCE_WIDTH}/{scaled})^{WIDTH_EXPONENT} = {rate:.3g} for {model} "
            "(best LoRA rates grow so as models narrow)"
        )
    if total_params >= 1_000_000_000:
        return 1e-5, "full fine-tune of a >=1B model: base 1e-5"
    return 5e-5, "full fine-tune of a small model: base 5e-5"


def decide_learning_rate(
    setting: Any, method: str, total_params: int, global_batch: int, hidden_size: int
) -> Decision:
    """Base rate by method and size (LoRA's by the model's width), scaled by
    sqrt(global batch / 16).

    Square-root scaling keeps the update's noise scale roughly constant for Adam-type
    optimizers when the batch changes (Malladi et al., 2022); linear scaling overshoots.
    ``find`` is resolved elsewhere (plan/lr_find.py), with a measured range test.
    """
    if given(setting) and setting != "find":
        return user(setting)
    base, why = base_rate(method, total_params, hidden_size)
    factor = math.sqrt(global_batch / REFERENCE_BATCH)
    value = float(f"{base * factor:.3g}")
    if setting == "find":
        return Decision(
            value,
            AUTO_SOURCE,
            f"find: a range test + held-out mini-sweep decides "
            f"when training starts (rule value {value:.3g} is the sweep's anchor)",
        )
    if global_batch == REFERENCE_BATCH:
        return Decision(value, AUTO_SOURCE, f"{why}, quoted at global batch {REFERENCE_BATCH}")
    return Decision(
        value,
        AUTO_SOURCE,
        f"{why} x sqrt({global_batch}/{REFERENCE_BATCH}) = "
        f"{value:.3g}: square-root scaling with the global batch",
    )


#: a rate set by hand this many times above (or below) the rule's is almost surely a typo or
#: a unit slip (5 for 5e-5): above it AdamW diverges within a few steps, below it nothing
#: moves. Wide enough for what lr-find picks (3e-3 on the demo: 21x the LoRA rule before it
#: scaled with width, 4.6x since)
IMPLAUSIBLE_ABOVE = 50
IMPLAUSIBLE_BELOW = 200


def check_rate(value: float, rule: float, method: str) -> list[str]:
    """A warning when a hand-set rate is far outside what fine-tuning uses."""
    if value > rule * IMPLAUSIBLE_ABOVE:
        return [
            f"learning_rate {value:g} is {value / rule:,.0f}x the rule's {rule:.3g} for this "
            f"{method} fine-tune: expect the loss to diverge (the guardian will skip and roll "
            "back steps); tunepilot lr-find measures a good rate"
        ]
    if value < rule / IMPLAUSIBLE_BELOW:
        return [
            f"learning_rate {value:g} is 1/{rule / value:,.0f} of the rule's {rule:.3g} for "
            f"this {method} fine-tune: the weights will hardly move; tunepilot lr-find "
            "measures a good rate"
        ]
    return []
