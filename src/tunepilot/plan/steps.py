"""Epochs, max_steps and the number of optimizer steps the run will take.

As in transformers, ``max_steps > 0`` overrides ``num_epochs``; the plan says which one governs.
"""

from __future__ import annotations

from typing import Any

from tunepilot.data.batching import steps_per_epoch
from tunepilot.plan.decision import AUTO_SOURCE, DEFAULT, Decision, given, user


def decide_epochs(setting: Any, n_train: int) -> Decision:
    if given(setting):
        return user(setting)
    if n_train < 1_000:
        return Decision(3.0, AUTO_SOURCE, f"small dataset ({n_train} examples): 3 passes")
    if n_train < 10_000:
        return Decision(2.0, AUTO_SOURCE, f"{n_train} examples: 2 passes")
    return Decision(1.0, AUTO_SOURCE, f"{n_train} examples: one pass avoids memorising them")


def decide_steps(
    epochs: Decision, max_steps_setting: Any, n_train: int, global_batch: int
) -> tuple[Decision, Decision, list[str]]:
    """Returns (max_steps, total_steps, warnings)."""
    per_epoch = steps_per_epoch(n_train, global_batch)
    warnings = []
    if given(max_steps_setting) and max_steps_setting > 0:
        total = max_steps_setting
        passes = total / per_epoch
        if passes > 10:
            warnings.append(
                f"max_steps {total} loops over the data {passes:.0f} times; expect "
                "memorisation — consider fewer steps or more data"
            )
        return (
            user(total, "set in the config; it overrides num_epochs"),
            Decision(
                total,
                AUTO_SOURCE,
                f"max_steps governs: {total} steps = {passes:.2f} epochs of {per_epoch} steps",
            ),
            warnings,
        )
    source = (
        user(max_steps_setting, "set to -1: num_epochs governs")
        if given(max_steps_setting)
        else Decision(-1, DEFAULT, "not set: num_epochs governs")
    )
    total = max(1, round(epochs.value * per_epoch))
    return (
        source,
        Decision(
            total,
            AUTO_SOURCE,
            f"num_epochs governs: {epochs.value:g} x "
            f"{per_epoch} steps per epoch ({n_train} examples / global batch "
            f"{global_batch}, last batch kept)",
        ),
        warnings,
    )
