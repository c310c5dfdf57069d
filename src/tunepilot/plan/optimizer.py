"""Optimizer, weight decay and gradient clipping."""

from __future__ import annotations

from typing import Any

import torch

from tunepilot.plan.decision import AUTO_SOURCE, DEFAULT, Decision, given, user


def fused_adamw_available(device: str) -> bool:
    # fused AdamW runs on CUDA and, since torch 2.4, on CPU
    return device == "cuda" or tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 4)


def decide_optimizer(setting: Any, device: str) -> Decision:
    impl = "fused" if fused_adamw_available(device) else "foreach"
    if given(setting):
        return user(setting, f"set in the config (torch AdamW, {impl} kernel)")
    return Decision(
        "adamw",
        AUTO_SOURCE,
        f"AdamW (torch, {impl} kernel): decoupled weight decay, "
        "the standard for transformers; no decay on biases and norm weights",
    )


def decide_weight_decay(setting: Any, method: str) -> Decision:
    if given(setting):
        return user(setting)
    if method == "lora":
        return Decision(
            0.0,
            AUTO_SOURCE,
            "LoRA: 0.0, the low-rank update is already a strong "
            "regulariser and decay only pulls adapters back toward doing nothing",
        )
    return Decision(
        0.01,
        AUTO_SOURCE,
        "full fine-tune: 0.01, a light pull toward zero that curbs overfitting small data",
    )


def decide_max_grad_norm(setting: Any) -> Decision:
    if given(setting):
        return user(setting)
    return Decision(
        1.0,
        DEFAULT,
        "clip the global gradient norm at 1.0: guards against a "
        "rare bad batch without touching normal steps",
    )
