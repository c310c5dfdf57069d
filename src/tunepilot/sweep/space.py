"""What a sweep searches, per method, and how a trial's values become a config.

The ranges are centred on the plan's own choices, so a sweep refines ``auto`` instead of
starting from nothing: the learning rate spans a decade either side of the planned rate
(log-uniform: rates matter by their ratio), warmup and weight decay cover the values fine-tuning
recipes use. LoRA also searches the rank with alpha tied to 2 x rank, so the adapter's scale
(alpha / rank) stays 2 and a rank change alters capacity, not the effective step size.
"""

from __future__ import annotations

import copy
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    distribution_to_json,
    json_to_distribution,
)
from optuna.trial import Trial

from tunepilot.config import AUTO

LR_SPAN = 10.0  # learning rate searched from planned / 10 to planned x 10
LORA_RANKS = (8, 16, 32)
ALPHA_PER_RANK = 2
SCHEDULERS = ("cosine", "linear", "constant_with_warmup")
WARMUP_RATIO = (0.0, 0.1)
WEIGHT_DECAY = (0.0, 0.1)


def search_space(method: str, planned_lr: float) -> dict[str, BaseDistribution]:
    """The knobs worth searching for ``method``, as Optuna distributions."""
    space: dict[str, BaseDistribution] = {
        "learning_rate": FloatDistribution(
            float(f"{planned_lr / LR_SPAN:.3g}"), float(f"{planned_lr * LR_SPAN:.3g}"), log=True
        ),
        "warmup_ratio": FloatDistribution(*WARMUP_RATIO),
        "weight_decay": FloatDistribution(*WEIGHT_DECAY),
    }
    if method == "lora":
        space["lora_r"] = CategoricalDistribution(LORA_RANKS)
        space["scheduler"] = CategoricalDistribution(SCHEDULERS)
    return space


def space_to_json(space: dict[str, BaseDistribution]) -> dict[str, str]:
    return {name: distribution_to_json(d) for name, d in space.items()}


def space_from_json(data: dict[str, str]) -> dict[str, BaseDistribution]:
    return {name: json_to_distribution(text) for name, text in data.items()}


def suggest(trial: Trial, space: dict[str, BaseDistribution]) -> dict[str, Any]:
    """Ask the trial's sampler for one value per knob."""
    params: dict[str, Any] = {}
    for name, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            params[name] = trial.suggest_categorical(name, dist.choices)
        elif isinstance(dist, FloatDistribution):
            params[name] = trial.suggest_float(name, dist.low, dist.high, log=dist.log)
        else:
            raise TypeError(f"{name}: unsupported distribution {dist!r}")
    return params


def apply_params(config: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config mapping with a trial's values in place (the rest untouched)."""
    out = copy.deepcopy(config)
    train, lora = out.setdefault("train", {}), out.setdefault("lora", {})
    for name, value in params.items():
        if name == "lora_r":
            lora["r"] = int(value)
            lora["alpha"] = float(ALPHA_PER_RANK * int(value))
        elif name == "warmup_ratio":
            train["warmup_ratio"] = float(value)
            train["warmup_steps"] = AUTO  # a config sets one of the two, never both
        else:
            train[name] = value
    return out
