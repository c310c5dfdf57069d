"""Weight decay groups by module type; schedules identical to transformers' formulas."""

import math

import pytest
import torch
from torch import nn

from tests.conftest import tiny_model
from tunepilot.train.optim import build_optimizer, build_scheduler, decay_groups


def test_no_decay_for_biases_and_norm_weights_by_module_type():
    class Odd(nn.Module):  # names chosen to fool name-based rules
        def __init__(self) -> None:
            super().__init__()
            self.norm_proj = nn.Linear(4, 4)  # "norm" in the name, still a Linear weight
            self.scale = nn.LayerNorm(4)  # no "norm" in the name, still a norm

    model = Odd()
    groups = decay_groups(model, 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert id(model.norm_proj.weight) in decayed
    assert id(model.norm_proj.bias) not in decayed
    assert id(model.scale.weight) not in decayed and id(model.scale.bias) not in decayed


def test_llama_rmsnorm_is_recognised():
    model = tiny_model()
    groups = decay_groups(model, 0.1)
    no_decay = {id(p) for p in groups[1]["params"]}
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert norms and all(id(m.weight) in no_decay for m in norms)
    assert id(model.model.layers[0].mlp.up_proj.weight) not in no_decay


def closed_form(name: str, step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if name == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if name == "cosine":
        return max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))
    return 1.0


@pytest.mark.parametrize("name", ["linear", "cosine", "constant_with_warmup"])
def test_schedule_values_match_transformers_formulas(name):
    param = nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([param], lr=1e-3)
    sched = build_scheduler(opt, name, warmup_steps=5, total_steps=40)
    for step in range(40):
        assert sched.get_last_lr()[0] == pytest.approx(1e-3 * closed_form(name, step, 5, 40))
        opt.step()
        sched.step()


def test_warmup_stable_decay_reaches_zero_and_plateaus():
    param = nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([param], lr=1.0)
    sched = build_scheduler(opt, "warmup_stable_decay", warmup_steps=4, total_steps=40)
    lrs = []
    for _ in range(40):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[4:36] == [1.0] * 32 and lrs[-1] < 0.3


def test_optimizer_is_adamw_with_two_groups():
    opt = build_optimizer(tiny_model(), 1e-3, 0.01, "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
