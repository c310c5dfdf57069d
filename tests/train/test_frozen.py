"""Frozen LoRA base weights stored in bf16 must compute exactly what autocast computes."""

import copy

import torch
from torch import nn

from tests.conftest import tiny_model, tokenized_chat, with_live_lora
from tunepilot.data.batching import micro_batches
from tunepilot.train import frozen, projections
from tunepilot.train.checks import GradientAudit, check_frozen
from tunepilot.train.projections import share_inputs
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


def test_grouped_frozen_weights_are_read_in_place_with_the_same_results(tokenizer, monkeypatch):
    """frozen.match lays out the frozen weights of layers that run as one matmul as rows of one
    buffer, which the matmul reads without concatenating: bit-identical to concatenating."""
    plain = lora_model()
    share_inputs(plain, torch.arange(4).unsqueeze(0))
    laid_out = copy.deepcopy(plain)
    loss, _ = accumulate(laid_out, batches(tokenizer, True), "bf16", "cpu", None)
    frozen_groups = [g for g in projections.groups(laid_out) if not g[0].weight.requires_grad]
    assert len(frozen_groups) == 2 * laid_out.config.num_hidden_layers  # q/k/v and gate/up
    for members in frozen_groups:
        weights = [m.weight for m in members]
        joined, _ = projections._joined(members, "cpu")
        assert joined.data_ptr() == weights[0].data_ptr()  # no copy
        assert torch.equal(joined, torch.cat(weights))
    trainable = next(g for g in projections.groups(laid_out) if g[0].weight.requires_grad)
    assert projections._rows_of_one_buffer([m.weight for m in trainable]) is None
    with monkeypatch.context() as m:
        m.setattr(projections, "_rows_of_one_buffer", lambda weights: None)  # concatenated
        expected, _ = accumulate(plain, batches(tokenizer, True), "bf16", "cpu", None)
    assert loss == expected
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for name, p in laid_out.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, grads[name]), name
    # back in fp32 each weight is its own tensor again, with its original values
    frozen.restore(laid_out)
    frozen.restore(plain)
    for members in frozen_groups:
        assert projections._rows_of_one_buffer([m.weight for m in members]) is None
        for m, original in zip(members, _same_layers(plain, laid_out, members), strict=True):
            assert m.weight.dtype == torch.float32 and torch.equal(m.weight, original.weight)


def _same_layers(a: nn.Module, b: nn.Module, members: list[nn.Module]) -> list[nn.Module]:
    names = {m: n for n, m in b.named_modules()}
    layers = dict(a.named_modules())
    return [layers[names[m]] for m in members]


def test_weights_in_separate_tensors_or_out_of_order_are_concatenated():
    rows = torch.randn(6, 4, dtype=torch.bfloat16)
    a, b = rows[:2], rows[2:]
    assert torch.equal(projections._rows_of_one_buffer([a, b]), rows)
    assert projections._rows_of_one_buffer([b, a]) is None
    assert projections._rows_of_one_buffer([a, rows[3:]]) is None  # a row between them
    assert projections._rows_of_one_buffer([a, b.clone()]) is None
    assert projections._rows_of_one_buffer([rows[:, :2], rows[:, 2:]]) is None  # columns
