"""AdamW with weight decay only where it belongs, and the learning-rate schedule."""

from __future__ import annotations

import math
import re

import torch
from torch import nn
from transformers import get_scheduler

from tunepilot.plan.optimizer import fused_adamw_available

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)
_NORM_NAME = re.compile(r"(RMS|Layer|Group|Batch)Norm\d*d?$")


def _is_norm(module: nn.Module) -> bool:
    # model-specific norms (LlamaRMSNorm, T5LayerNorm...) do not subclass torch's, so the
    # class name is the only type information we get
    return isinstance(module, _NORM_TYPES) or bool(_NORM_NAME.search(type(module).__name__))


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and biases + normalisation weights (never decayed).

    Chosen by module type and parameter role, not by matching parameter names: a norm module's
    weights are gains around 1, and pulling them toward 0 damages the model.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for role, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if _is_norm(module) or role == "bias" else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, device: str
) -> torch.optim.Optimizer:
    groups = decay_groups(model, weight_decay)
    fused = fused_adamw_available(device)
    return torch.optim.AdamW(
        groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused, foreach=None if fused else True
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Schedules come from transformers so they match what users know, value for value."""
    extra = {}
    if name == "warmup_stable_decay":
        # decay over the last 10% of training (the WSD paper's default)
        extra = {"num_decay_steps": max(1, math.ceil(0.1 * total_steps))}
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=total_steps,
        scheduler_specific_kwargs=extra,
    )
