"""The loss through the model's own forward (FSDP2, soft-capped logits) keeps only the logits
it scores, and equals the fused path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import tiny_model, tokenized_chat
from tunepilot.data.batching import collate, micro_batches
from tunepilot.train import step


@pytest.fixture
def examples(tokenizer):
    return tokenized_chat(tokenizer, 6, seed=4)


def batch_loss_and_grads(model: nn.Module, batch) -> tuple[float, list[torch.Tensor]]:
    """Through step.loss_sum on a Batch (conftest's loss_and_grads takes input ids and the
    model's own loss)."""
    model.zero_grad()
    loss = step.loss_sum(model, batch, "fp32", "cpu")
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("packed", [False, True])
def test_the_models_own_forward_scores_supervised_positions_only(
    monkeypatch, examples, tokenizer, packed: bool
):
    if packed:
        (batch,) = micro_batches(examples, 6, 2048, tokenizer.pad_token_id, True)
        assert batch.packed
    else:
        batch = collate(examples, 512, tokenizer.pad_token_id)
    model = tiny_model(seed=3)
    fused_loss, fused_grads = batch_loss_and_grads(model, batch)

    head_rows: list[int] = []
    model.lm_head.register_forward_hook(lambda m, args, out: head_rows.append(args[0].shape[1]))
    monkeypatch.setattr(step, "_parts", lambda model: None)  # as for a sharded model
    own_loss, own_grads = batch_loss_and_grads(model, batch)

    assert own_loss == pytest.approx(fused_loss, rel=1e-5)
    for a, b in zip(own_grads, fused_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    supervised = int((batch.labels[:, 1:] != -100).any(dim=0).sum())
    assert head_rows == [supervised] and supervised < batch.input_ids.shape[1] - 1


class WithoutLogitsToKeep(nn.Module):
    """A causal LM whose forward does not take ``logits_to_keep``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def test_a_model_without_logits_to_keep_gets_whole_logits(monkeypatch, examples, tokenizer):
    batch = collate(examples, 512, tokenizer.pad_token_id)
    model = tiny_model(seed=3)
    fused_loss, _ = batch_loss_and_grads(model, batch)
    monkeypatch.setattr(step, "_parts", lambda model: None)
    own_loss, _ = batch_loss_and_grads(WithoutLogitsToKeep(model), batch)
    assert own_loss == pytest.approx(fused_loss, rel=1e-5)
