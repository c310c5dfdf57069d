"""Linear layers reading the same input run as one matmul: same losses and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.conftest import loss_and_grads, max_rel, tiny_model, with_live_lora
from tunepilot.model import add_lora
from tunepilot.train import projections
from tunepilot.train.projections import share_inputs, unshare

IDS = torch.arange(4).unsqueeze(0)


def _batch(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(seed))


def _groups(model: nn.Module) -> list[list[str]]:
    names = {m: n for n, m in model.named_modules()}
    seen, out = set(), []
    for m in model.modules():
        group = vars(m).get("_tunepilot_group")
        if group and id(group[0]) not in seen:
            seen.add(id(group[0]))
            out.append([names[x].removesuffix(".default").split(".")[-1] for x in group[0].members])
    return out


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_full_model_groups_qkv_and_gate_up_and_trains_the_same(precision):
    model = tiny_model(vocab_size=512)
    before = loss_and_grads(model, _batch(), precision)
    assert share_inputs(model, IDS) == (3 + 2) * model.config.num_hidden_layers
    assert _groups(model) == [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]] * 2
    after = loss_and_grads(model, _batch(), precision)
    tolerance = 1e-5 if precision == "fp32" else 2e-2
    assert max_rel(after[0], before[0]) < tolerance
    assert before[1].keys() == after[1].keys()
    for name, g in before[1].items():
        assert max_rel(after[1][name], g) < (1e-4 if precision == "fp32" else 5e-2), name
    # every group handed out all its outputs: nothing is held between forwards
    assert all(vars(m)["_tunepilot_group"][0].pending is None for m in _grouped(model))


def _grouped(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if "_tunepilot_group" in vars(m)]


def test_lora_groups_frozen_and_trainable_layers_apart():
    """The A matrices read what the frozen layers read, but a shared matmul would compute the
    frozen weights' gradient for nothing: base layers and A matrices form separate groups."""
    model = with_live_lora(tiny_model(vocab_size=512), std=0.1)
    before = loss_and_grads(model, _batch())
    assert share_inputs(model, IDS) == 2 * (3 + 3 + 2 + 2)
    for group in _grouped(model):
        members = vars(group)["_tunepilot_group"][0].members
        assert len({m.weight.requires_grad for m in members}) == 1
    assert ["lora_A", "lora_A", "lora_A"] in _groups(model)
    after = loss_and_grads(model, _batch())
    assert max_rel(after[0], before[0]) < 1e-5
    assert before[1].keys() == after[1].keys()  # only the adapters have gradients
    for name, g in before[1].items():
        assert max_rel(after[1][name], g) < 1e-4, name


def test_lora_dropout_gives_each_adapter_its_own_input():
    model = tiny_model(vocab_size=512)
    for p in model.parameters():
        p.requires_grad_(False)
    model = add_lora(model, 4, 8, 0.1, "all-linear")
    share_inputs(model, IDS)
    assert all("lora" not in name for group in _groups(model) for name in group)
    model.eval()  # in eval mode dropout passes the same tensor on: still correct, ungrouped
    ids = _batch()
    grouped = model(input_ids=ids).logits
    unshare(model)
    assert torch.allclose(model(input_ids=ids).logits, grouped, atol=1e-5)


def test_weights_changed_in_place_are_seen_at_once():
    """No cached concatenation: an optimizer (fused AdamW bumps no version counter) or an
    adapter merge changes the weights in place, and the next forward must use them."""
    model = tiny_model(vocab_size=512)
    share_inputs(model, IDS)
    ids = _batch()
    first = model(input_ids=ids).logits
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.data.mul_(3.0)
        model.model.layers[1].mlp.up_proj.weight.data.mul_(-1.0)
    changed = model(input_ids=ids).logits
    unshare(model)
    assert not torch.allclose(first, changed)
    assert torch.allclose(model(input_ids=ids).logits, changed, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_weights_fixed_joins_each_group_once_without_gradients_and_forgets_after(
    monkeypatch, precision
):
    """An evaluation joins a full fine-tune's grouped weights once (generation would at every
    token); forwards that need gradients join afresh, and after the block a changed weight is
    seen again."""
    model = tiny_model(vocab_size=512)
    share_inputs(model, IDS)
    ids = _batch()
    joins = []
    real = projections._joined
    monkeypatch.setattr(projections, "_joined", lambda *a: joins.append(1) or real(*a))
    groups = 2 * model.config.num_hidden_layers
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16")
    with autocast, torch.no_grad():
        expected = model(input_ids=ids).logits
    joins.clear()
    with projections.weights_fixed(), autocast:
        with torch.no_grad():
            first = model(input_ids=ids).logits
            assert len(joins) == groups
            second = model(input_ids=ids).logits
            assert len(joins) == groups  # joined once
        with_grad = model(input_ids=ids).logits
        assert len(joins) == 2 * groups  # gradients need the parameters themselves
        with_grad.sum().backward()
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert projections._fixed is None
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(3.0)
        with autocast:
            assert not torch.equal(model(input_ids=ids).logits, expected)


def test_a_member_called_with_another_input_computes_alone():
    model = tiny_model(vocab_size=512)
    share_inputs(model, IDS)
    attn = model.model.layers[0].self_attn
    x, y = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    q = attn.q_proj(x)
    k = attn.k_proj(y)  # not x: its own matmul, not x's slice
    v = attn.v_proj(x)  # x's slice, still waiting
    assert torch.allclose(q, x @ attn.q_proj.weight.T, atol=1e-6)
    assert torch.allclose(k, y @ attn.k_proj.weight.T, atol=1e-6)
    assert torch.allclose(v, x @ attn.v_proj.weight.T, atol=1e-6)
    # a later member first, with nothing pending: computes the group, correct all the same
    k2 = attn.k_proj(x)
    assert torch.allclose(k2, x @ attn.k_proj.weight.T, atol=1e-6)


def test_unshare_restores_plain_layers_and_state_dicts_never_change():
    model = tiny_model(vocab_size=512)
    keys = set(model.state_dict())
    share_inputs(model, IDS)
    assert set(model.state_dict()) == keys
    unshare([model.model.layers[0].mlp])  # a group is undone whole
    assert [g for g in _groups(model) if "gate_proj" in g] == [["gate_proj", "up_proj"]]
    unshare(model)
    assert not _grouped(model)
    assert all("forward" not in vars(m) for m in model.modules() if type(m) is nn.Linear)


def test_a_deep_copy_shares_within_itself():
    """Export verification deep-copies the model: the copy's groups must hold the copy's layers,
    or it would compute with the original's weights."""
    model = tiny_model(vocab_size=512)
    share_inputs(model, IDS)
    clone = copy.deepcopy(model)
    layers = set(clone.modules())
    assert all(m in layers for g in _grouped(clone) for m in vars(g)["_tunepilot_group"][0].members)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(0.5)
    ids = _batch()
    halved = clone(input_ids=ids).logits
    unshare(clone)
    assert torch.allclose(clone(input_ids=ids).logits, halved, atol=1e-5)
    assert not torch.allclose(model(input_ids=ids).logits, halved)
