"""Micro-batch 8 x accumulation 1 must give the same gradients as 2 x 4 (and 1 x 8).

On variable-length data this only holds when the loss is normalised by the supervised tokens of
the whole optimizer step, not averaged per micro-batch.
"""

import torch

from tests.conftest import tiny_model, tokenized_chat
from tunepilot.data.batching import collate
from tunepilot.train.step import accumulate


def grads_for(micro: int, examples, pad_id: int) -> tuple[float, list[torch.Tensor]]:
    model = tiny_model(seed=1)
    model.train()
    batches = [
        collate(examples[i : i + micro], 256, pad_id) for i in range(0, len(examples), micro)
    ]
    loss, tokens = accumulate(model, batches, "fp32", "cpu", None)
    assert tokens == sum(b.supervised_tokens for b in batches)
    return loss, [p.grad.clone() for p in model.parameters()]


def test_accumulation_equivalence_on_variable_lengths(tokenizer):
    examples = tokenized_chat(tokenizer, 8, seed=3)
    lengths = {len(e.input_ids) for e in examples}
    supervised = {e.supervised for e in examples}
    assert len(lengths) > 3 and len(supervised) > 3  # the test is meaningless on equal lengths
    pad = tokenizer.unk_token_id
    loss8, g8 = grads_for(8, examples, pad)
    for micro in (2, 1):
        loss, g = grads_for(micro, examples, pad)
        assert abs(loss - loss8) < 1e-5
        for a, b in zip(g, g8, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_naive_mean_of_means_would_differ(tokenizer):
    """Guards the test above: the per-micro-batch mean really does weight tokens unequally."""
    examples = tokenized_chat(tokenizer, 8, seed=3)
    per_micro = [sum(e.supervised for e in examples[i : i + 2]) for i in range(0, 8, 2)]
    assert len(set(per_micro)) > 1
