"""Trained parameters change, frozen ones do not, and silent no-gradient setups are caught."""

import pytest
import torch

from tests.conftest import tiny_model
from tunepilot.data.batching import collate
from tunepilot.data.tokenize import Tokenized
from tunepilot.errors import RunError
from tunepilot.model import add_lora, enable_gradient_checkpointing
from tunepilot.train import checks
from tunepilot.train.checks import GradientAudit
from tunepilot.train.optim import build_optimizer, build_scheduler
from tunepilot.train.step import accumulate, update


def batch():
    ids = list(range(5, 37))
    ex = Tokenized(ids, [False] * 8 + [True] * 24, 8, None, "x:1")
    return [collate([ex, ex], 64, 0)]


def lora_model():
    model = tiny_model()
    for p in model.parameters():
        p.requires_grad_(False)
    return add_lora(model, 4, 8, 0.0, "all-linear")


def run_steps(model, steps: int, warmup: int = 0):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, 1e-2, 0.0, "cpu")
    sched = build_scheduler(opt, "linear", warmup, steps)
    audit = GradientAudit.start(model)
    for step in range(1, steps + 1):
        accumulate(model, batch(), "fp32", "cpu", None)
        audit.after_backward(model, step, sched.get_last_lr()[0])
        update(params, opt, sched, None, 1.0)
        audit.after_update(model, step, steps)
    return audit


def test_lora_trains_adapters_and_leaves_base_untouched():
    model = lora_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_steps(model, 3, warmup=1)  # warmup: step 1 has lr 0, the audit must wait for it
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == p.requires_grad, name


def test_lora_with_checkpointing_still_gets_gradients():
    model = lora_model()
    enable_gradient_checkpointing(model)
    run_steps(model, 3)


def test_parameter_outside_the_loss_path_is_caught():
    model = tiny_model()
    model.extra = torch.nn.Linear(2, 2)  # trainable but never used by the forward pass
    with pytest.raises(RunError, match="got no gradient"):
        run_steps(model, 2)


def test_frozen_parameter_that_moves_is_caught():
    model = lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, 1e-2, 0.0, "cpu")
    sched = build_scheduler(opt, "constant", 0, 2)
    audit = GradientAudit.start(model)
    accumulate(model, batch(), "fp32", "cpu", None)
    audit.after_backward(model, 1, 1e-2)
    update(params, opt, sched, None, 1.0)
    with torch.no_grad():
        model.base_model.model.model.norm.weight.add_(1.0)  # a bug that touches frozen weights
    with pytest.raises(RunError, match="frozen parameters changed"):
        audit.after_update(model, 1, 2)


def reentrant_trap(model):
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    # transformers now patches the trap by making embedding outputs require grad; undo that to
    # recreate what older stacks (and hand-written loops) do
    model.disable_input_require_grads()
    return model


def test_reentrant_checkpointing_trap_is_caught():
    """The silent failure: layers' adapters get no gradient while something after them does."""
    model = reentrant_trap(lora_model())
    model.base_model.model.model.norm.weight.requires_grad_(True)  # keeps the loss on the graph
    with pytest.raises(RunError, match="got no gradient after the first backward"):
        run_steps(model, 2)


def test_loss_with_no_trainable_path_is_caught():
    model = reentrant_trap(lora_model())
    with pytest.raises(RunError, match="does not depend on any trainable parameter"):
        run_steps(model, 2)


def test_fingerprint_in_pieces_is_the_whole_tensor_fingerprint_and_sees_a_swap(monkeypatch):
    """Pieces bound the float64 temporaries on a full GPU; the sums must not depend on them,
    and the ramp must tell two values that swapped places apart (a plain sum cannot)."""
    model = lora_model()
    whole = checks.fingerprint(model)
    monkeypatch.setattr(checks, "PIECE", 1000)  # the embedding alone is ~800 pieces
    pieces = checks.fingerprint(model)
    assert pieces.keys() == whole.keys() and len(whole) > 0
    for name, (total, weighted) in whole.items():
        assert pieces[name] == pytest.approx((total, weighted), rel=1e-12, abs=1e-9)
    weight = dict(model.named_parameters())["base_model.model.model.embed_tokens.weight"]
    with torch.no_grad():
        flat = weight.view(-1)
        flat[[10, 5000]] = flat[[5000, 10]].clone()  # across two pieces
    swapped = checks.fingerprint(model)
    name = "base_model.model.model.embed_tokens.weight"
    assert swapped[name][0] == pytest.approx(pieces[name][0], rel=1e-12)  # same sum
    assert swapped[name][1] != pieces[name][1]  # the ramp sees it


def test_lora_on_a_gpt2_style_model_trains_without_peft_warnings():
    import warnings

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_positions=64, n_embd=16, n_layer=2, n_head=2)
    )
    for p in model.parameters():
        p.requires_grad_(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora = add_lora(model, 4, 8, 0.0, "all-linear")
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    ids = torch.arange(1, 17).unsqueeze(0)
    lora.train()
    lora(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_B" in n]
    assert len(grads) == 8 and all(g is not None and g.abs().sum() > 0 for g in grads)
