"""Frozen LoRA base weights stored in bf16 must compute exactly what autocast computes."""

import copy

import torch
from torch import nn

from tests.conftest import tiny_model, tokenized_chat, with_live_lora
from tunepilot.data.batching import micro_batches
from tunepilot.train import frozen
from tunepilot.train.checks import GradientAudit, check_frozen
from tunepilot.train.step import accumulate


def lora_model() -> nn.Module:
    return with_live_lora(tiny_model(vocab_size=49152), 0.1)


def batches(tokenizer, packing: bool):
    examples = tokenized_chat(tokenizer, 4, seed=3)
    return micro_batches(examples, 2, 256, tokenizer.pad_token_id, packing)


def frozen_linear_weights(model: nn.Module) -> list[torch.Tensor]:
    """The frozen projections inside the layers (the tied output head is an embedding too)."""
    return [
        m.weight
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not m.weight.requires_grad and "lm_head" not in name
    ]


def test_bf16_frozen_weights_give_bit_identical_loss_and_gradients(tokenizer, monkeypatch):
    plain = lora_model()
    cast = copy.deepcopy(plain)
    for packing in (False, True):
        loss, _ = accumulate(cast, batches(tokenizer, packing), "bf16", "cpu", None)
        assert {w.dtype for w in frozen_linear_weights(cast)} == {torch.bfloat16}
        with monkeypatch.context() as m:
            m.setattr(frozen, "match", lambda model, dtype: None)  # autocast casts every time
            expected, _ = accumulate(plain, batches(tokenizer, packing), "bf16", "cpu", None)
        assert {w.dtype for w in frozen_linear_weights(plain)} == {torch.float32}
        assert loss == expected
        grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
        for name, p in cast.named_parameters():
            if p.requires_grad:
                assert torch.equal(p.grad, grads[name]), name


def test_tied_embeddings_and_trainable_weights_stay_fp32():
    model = lora_model()
    frozen.match(model, torch.bfloat16)
    base = model.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight  # tied in the tiny config
    assert base.model.embed_tokens.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "norm" in n)


def test_fp32_and_restore_bring_back_the_very_same_originals():
    model = lora_model()
    before = [(w.data_ptr(), w.clone()) for w in frozen_linear_weights(model)]
    frozen.match(model, torch.bfloat16)
    assert all(w.dtype == torch.bfloat16 for w in frozen_linear_weights(model))
    frozen.match(model, torch.bfloat16)  # a second call changes nothing
    frozen.match(model, torch.float32)  # e.g. the guardian's fallback to fp32
    for (pointer, value), w in zip(before, frozen_linear_weights(model), strict=True):
        assert w.dtype == torch.float32 and w.data_ptr() == pointer and torch.equal(w, value)
    frozen.match(model, torch.bfloat16)
    adapted = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert adapted and not any(m.cast_input_dtype_enabled for m in adapted)
    frozen.restore(model)
    assert all(w.dtype == torch.float32 for w in frozen_linear_weights(model))
    # peft's own cast is back for code outside autocast (fp32 adapters on fp32 inputs)
    assert all(m.cast_input_dtype_enabled for m in adapted)
    frozen.restore(model)  # nothing cast: a no-op


def test_the_frozen_weights_audit_reads_the_originals():
    model = lora_model()
    audit = GradientAudit.start(model)
    frozen.match(model, torch.bfloat16)
    check_frozen(model, audit.frozen)  # rounded copies in use: the weights did not change
    with torch.no_grad():
        frozen.original(model, frozen_linear_weights(model)[0]).add_(1.0)
    try:
        check_frozen(model, audit.frozen)
    except Exception as exc:
        assert "frozen parameters changed" in str(exc)
    else:
        raise AssertionError("a changed frozen weight went unnoticed")
