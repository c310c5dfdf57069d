"""LoRA layers adding their adapter's product inside the matmul: peft's values and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import loss_and_grads, max_rel, tiny_model, with_live_lora
from tunepilot.train.adapters import fuse_adapter_sums
from tunepilot.train.projections import share_inputs


def _batch() -> torch.Tensor:
    return torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(5))


def _switched(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if "forward" in vars(m) and hasattr(m, "lora_A")]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("shared", [False, True])
def test_same_loss_and_adapter_gradients_as_peft(precision, shared):
    model = with_live_lora(tiny_model(vocab_size=512), std=0.1)
    before = loss_and_grads(model, _batch(), precision)
    assert fuse_adapter_sums(model) == 7 * model.config.num_hidden_layers
    if shared:  # as training loads it: fused sums over shared projections
        share_inputs(model, torch.arange(4).unsqueeze(0))
    after = loss_and_grads(model, _batch(), precision)
    loss_tol, grad_tol = (1e-6, 1e-4) if precision == "fp32" else (1e-2, 5e-2)
    assert max_rel(after[0], before[0]) < loss_tol
    assert before[1].keys() == after[1].keys() and before[1]
    for name, g in before[1].items():
        assert max_rel(after[1][name], g) < grad_tol, name


def test_merged_disabled_and_other_cases_run_pefts_own_forward():
    model = with_live_lora(tiny_model(vocab_size=512), std=0.1)
    model.eval()
    ids = _batch()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        fuse_adapter_sums(model)
        assert torch.allclose(model(input_ids=ids).logits, adapted, atol=1e-5)
        with model.disable_adapter():
            assert torch.allclose(model(input_ids=ids).logits, base, atol=1e-6)
        model.merge_adapter()  # base weights now hold the adapters: no second addition
        assert torch.allclose(model(input_ids=ids).logits, adapted, atol=1e-4)
        model.unmerge_adapter()
        assert torch.allclose(model(input_ids=ids).logits, adapted, atol=1e-4)


def test_dropout_still_applies_in_training():
    model = with_live_lora(tiny_model(vocab_size=512), std=0.1, dropout=0.5)
    fuse_adapter_sums(model)
    ids = _batch()
    model.train()
    torch.manual_seed(0)
    first = model(input_ids=ids).logits
    torch.manual_seed(1)
    second = model(input_ids=ids).logits
    assert not torch.allclose(first, second)  # dropout on the adapters' input
    model.eval()
    assert torch.allclose(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_full_model_has_nothing_to_switch():
    assert fuse_adapter_sums(tiny_model(vocab_size=512)) == 0
