"""Maximum sequence length, and what truncation to it would cost."""

from __future__ import annotations

import math
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


TRAIN_REMEDY = "raise train.max_length to at least {}, or set it to auto"
EVAL_REMEDY = (
    "evaluations score up to micro_batch_size x max_length tokens of each example: raise "
    "train.max_length to at least {}"
)
COVERAGE = 0.99  # share of examples kept whole by the auto length
MAX_LOST_SIGNAL = 0.01  # share of supervised tokens the auto length may cut


def decide_max_length(setting: Any, examples: list[Tokenized], model_context: int) -> Decision:
    """Auto: the smallest multiple of 64 that keeps 99% of examples whole, capped by the context.

    The longest 1% of examples usually set the padding and memory of every batch; cutting them
    is worth it unless it throws away real training signal: if more than 1% of supervised tokens
    would be lost, the length grows to keep every example whole (the counts are in the reason).
    """
    lengths = sorted(len(ex.input_ids) for ex in examples)
    longest = lengths[-1]
    if given(setting):
        if setting > model_context:
            raise UserError(
                f"train.max_length: {setting} exceeds the model's context of "
                f"{model_context} tokens; set it to {model_context} or less"
            )
        require_targets(examples, setting, model_context, "training", TRAIN_REMEDY)
        return user(setting)
    # auto keeps every target unless the context is too short; say so before anything runs
    require_targets(examples, min(rounded(longest), model_context), model_context, "training", "")
    covered = lengths[max(0, math.ceil(COVERAGE * len(lengths)) - 1)]
    fit = min(rounded(covered), model_context)
    full = min(rounded(longest), model_context)
    if fit >= full:
        why = "nothing is truncated" if full >= longest else "capped by the model's context"
        return Decision(
            full,
            AUTO_SOURCE,
            f"longest example is {longest} tokens, rounded up to a multiple of {MULTIPLE}: {why}",
        )
    cut = truncation(examples, fit)
    total = sum(ex.supervised for ex in examples) or 1
    lost = cut.supervised_tokens / total
    if lost > MAX_LOST_SIGNAL:
        return Decision(
            full,
            AUTO_SOURCE,
            f"{fit} would keep {COVERAGE:.0%} of examples whole "
            f"but cut {cut.supervised_tokens} supervised tokens ({lost:.1%} of the "
            f"training signal); {full} keeps every example whole",
        )
    return Decision(
        fit,
        AUTO_SOURCE,
        f"smallest multiple of {MULTIPLE} keeping {COVERAGE:.0%} of "
        f"examples whole (longest {longest}); truncates {cut.examples} examples, "
        f"{cut.supervised_tokens} supervised tokens ({lost:.2%})",
    )


def require_targets(
    examples: list[Tokenized], max_length: int, model_context: int, kind: str, remedy: str
) -> None:
    """Stop before anything heavy runs when cutting to ``max_length`` leaves none of
    ``examples`` a single target: every training batch would be empty (the guardian found that
    out only at step 1, after the probe and the first evaluation, and blamed the learning
    rate), and an eval loss over no tokens is NaN. Some examples emptied is a plan warning.

    ``kind``: "training" or "eval"; ``remedy``: how to reach the length that keeps targets,
    said when the model's context allows it."""
    if not examples or truncation(examples, max_length).emptied < len(examples):
        return
    # the shortest length that keeps one target of some example
    needed = min((ex.loss_mask.index(True) + 1 for ex in examples if ex.supervised), default=0)
    if not needed:  # nothing supervised at any length: the data checks say so, not this
        return
    where = examples[0].where.rpartition(":")[0] or examples[0].where
    cut = "max_length" if kind == "training" else "the length evaluations score,"
    if remedy and needed <= model_context:
        fix = remedy.format(min(rounded(needed), model_context))
    else:
        fix = (
            f"the model's context is {model_context} tokens: shorten the prompts, or use a "
            "model with a longer context"
        )
    raise UserError(
        f"{where}: cut to {cut} {max_length}, every one of its {len(examples)} {kind} "
        f"examples loses all of its targets (the earliest is token {needed}); {fix}"
    )


def rounded(n: int) -> int:
    """``n`` rounded up to the multiple of 64 that lengths are chosen in."""
    return -(-n // MULTIPLE) * MULTIPLE
