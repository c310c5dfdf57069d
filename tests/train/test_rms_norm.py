"""The hand-written RMSNorm: the same function and gradients as transformers' own."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tests.conftest import max_rel, tiny_model, with_live_lora
from tunepilot.train.rms_norm import fast_norms, rms_norm, use_fast_norms


def _norm(width: int = 48, eps: float = 1e-5) -> LlamaRMSNorm:
    torch.manual_seed(0)
    norm = LlamaRMSNorm(width, eps)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(width) + 0.5)
    return norm


def _forward_backward(fn, x0: torch.Tensor, weight: torch.nn.Parameter, grad: torch.Tensor):
    x = x0.clone().requires_grad_(True)
    weight.grad = None
    y = fn(x)
    y.backward(grad.to(y.dtype))
    return y.detach(), x.grad, weight.grad


def test_fp32_matches_transformers_values_and_gradients():
    norm = _norm()
    torch.manual_seed(1)
    x = torch.randn(2, 7, 48) * 4
    grad = torch.randn(2, 7, 48)
    theirs = _forward_backward(norm, x, norm.weight, grad)
    ours = _forward_backward(lambda t: rms_norm(t, norm.weight, 1e-5), x, norm.weight, grad)
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype
        assert max_rel(a, b) < 1e-5


def test_bf16_input_rounds_where_transformers_rounds():
    """A bf16 input gives an fp32 output (fp32 weight times the bf16-rounded normalised input)
    and a bf16 input gradient, as transformers' does; values agree to bf16 rounding."""
    norm = _norm()
    torch.manual_seed(1)
    x = (torch.randn(3, 5, 48) * 4).to(torch.bfloat16)
    grad = torch.randn(3, 5, 48)
    theirs = _forward_backward(norm, x, norm.weight, grad)
    ours = _forward_backward(lambda t: rms_norm(t, norm.weight, 1e-5), x, norm.weight, grad)
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype
        assert max_rel(a, b) < 1e-2  # one bf16 step is 0.4-0.8%


def test_gradient_is_the_true_gradient():
    """Against finite differences in float64, not only against another implementation."""
    torch.manual_seed(2)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x, w))


def test_frozen_weight_and_input_without_gradient():
    norm = _norm()
    norm.weight.requires_grad_(False)
    x = torch.randn(4, 48, requires_grad=True)
    rms_norm(x, norm.weight, 1e-5).sum().backward()
    assert x.grad is not None and norm.weight.grad is None
    w = torch.nn.Parameter(norm.weight.detach().clone())
    rms_norm(torch.randn(4, 48), w, 1e-5).sum().backward()
    assert w.grad is not None


def test_model_switched_trains_the_same():
    """Every norm of a tiny Llama is switched; loss and every gradient stay the same."""
    model = tiny_model(vocab_size=512)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))

    def grads(m):
        m.zero_grad(set_to_none=True)
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    before = grads(model)
    switched = use_fast_norms(model)
    assert switched == 2 * model.config.num_hidden_layers + 1
    assert use_fast_norms(model) == switched  # idempotent: counts, switches nothing twice
    assert fast_norms(model) == switched
    after = grads(model)
    assert max_rel(after[0], before[0]) < 1e-6
    for name, g in before[1].items():
        assert max_rel(after[1][name], g) < 1e-4, name
    # nothing else changed: same parameters, and a copy still works
    assert set(model.state_dict()) == set(tiny_model(vocab_size=512).state_dict())
    clone = copy.deepcopy(model)
    assert torch.equal(clone(input_ids=ids).logits, model(input_ids=ids).logits)


def test_lora_model_switched():
    model = with_live_lora(tiny_model(vocab_size=512), std=0.1)
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(4))
    reference = model(input_ids=ids, labels=ids).loss.detach()
    assert use_fast_norms(model) == 2 * 2 + 1
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert max_rel(loss, reference) < 1e-6
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("make", [lambda: GemmaRMSNorm(32, eps=1e-6)])
def test_a_norm_that_computes_something_else_is_left_alone(make):
    """Gemma's norm scales by 1 + weight: the probe sees the difference."""
    holder = torch.nn.Sequential(make())
    assert use_fast_norms(holder) == 0
    assert "forward" not in vars(holder[0])
