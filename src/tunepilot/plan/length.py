"""Maximum sequence length, and what truncation to it would cost."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tunepilot.data.tokenize import Tokenized
from tunepilot.errors import UserError
from tunepilot.plan.decision import AUTO_SOURCE, Decision, given, user

MULTIPLE = 64


@dataclass(frozen=True)
class Truncation:
    examples: int  # examples longer than max_length
    tokens: int  # tokens cut off
    supervised_tokens: int  # of which carried loss (lost training signal)
    emptied: int  # examples left with no supervised token at all (dropped, and reported)


def percentiles(lengths: list[int]) -> dict[str, int]:
    arr = np.asarray(lengths)
    return {f"p{q}": int(np.percentile(arr, q)) for q in (50, 90, 95, 99)} | {
        "min": int(arr.min()),
        "max": int(arr.max()),
        "mean": int(arr.mean()),
    }


def truncation(examples: list[Tokenized], max_length: int) -> Truncation:
    n = tokens = supervised = emptied = 0
    for ex in examples:
        if len(ex.input_ids) > max_length:
            n += 1
            tokens += len(ex.input_ids) - max_length
            lost = sum(ex.loss_mask[max_length:])
            supervised += lost
            emptied += lost == ex.supervised
    return Truncation(n, tokens, supervised, emptied)


def decide_max_length(setting: Any, examples: list[Tokenized], model_context: int) -> Decision:
    """Auto: the longest example rounded up to a multiple of 64, capped by the model's context.

    The spine keeps every token it can; the autopilot trades the longest tail for speed.
    """
    longest = max(len(ex.input_ids) for ex in examples)
    if given(setting):
        if setting > model_context:
            raise UserError(
                f"train.max_length: {setting} exceeds the model's context of "
                f"{model_context} tokens; set it to {model_context} or less"
            )
        return user(setting)
    fit = -(-longest // MULTIPLE) * MULTIPLE
    if fit <= model_context:
        return Decision(
            fit,
            AUTO_SOURCE,
            f"longest training example is {longest} tokens, "
            f"rounded up to a multiple of {MULTIPLE}: nothing is truncated",
        )
    return Decision(
        model_context,
        AUTO_SOURCE,
        f"longest example ({longest} tokens) exceeds the "
        f"model's context; capped at {model_context} (truncation reported below)",
    )
