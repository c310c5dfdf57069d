"""train.compile: the same training steps compiled as eager, eager again afterwards, and a
compiler that fails leaves training eager instead of failing it."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_model, tokenized_chat
from tunepilot.data.batching import micro_batches
from tunepilot.plan.compilation import compiler_available
from tunepilot.train.compiled import compiled, hot_modules
from tunepilot.train.projections import share_inputs, shared
from tunepilot.train.rms_norm import use_fast_norms
from tunepilot.train.step import accumulate

needs_compiler = pytest.mark.skipif(not compiler_available(), reason="no C++ compiler")


def train_two_steps(model, batches) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for batch in batches:
        loss, _ = accumulate(model, [batch], "fp32", "cpu", None)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss)
    return losses


@needs_compiler
def test_compiled_steps_equal_eager_steps_and_modules_are_eager_afterwards(tokenizer):
    examples = tokenized_chat(tokenizer, 8, seed=2)
    # two packed steps of different lengths: the second reuses the dynamic-shape graphs
    batches = [
        *micro_batches(examples[:4], 4, 512, tokenizer.pad_token_id, True),
        *micro_batches(examples[4:], 4, 512, tokenizer.pad_token_id, True),
    ]
    assert batches[0].input_ids.shape != batches[1].input_ids.shape
    eager = train_two_steps(tiny_model(seed=4), batches)
    model = tiny_model(seed=4)
    use_fast_norms(model)  # as training loads it: compiled through the hand-written norm
    share_inputs(model, torch.arange(4).unsqueeze(0))  # and with shared projections
    modules = hot_modules(model)
    assert len(modules) == 2 * 3  # per layer: the MLP and two norms, not the attention
    with compiled(model, True, "fp32", "cpu") as said:
        assert said.startswith("torch.compile on 6")
        assert all(m._compiled_call_impl is not None for m in modules)
        # the compiled feed-forward computes gate and up alone; attention still shares q/k/v
        assert shared(model) == (3 * 2, 2)
        got = train_two_steps(model, batches)
    assert got == pytest.approx(eager, rel=1e-5)
    assert all(m._compiled_call_impl is None for m in modules)


def test_a_failing_compiler_leaves_training_eager(monkeypatch):
    def broken(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("InductorError: C++ compile error\nmore detail")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    model = tiny_model(seed=4)
    with compiled(model, True, "fp32", "cpu") as said:
        assert said == "eager (torch.compile failed: InductorError: C++ compile error)"
        assert all(m._compiled_call_impl is None for m in hot_modules(model))
        model(input_ids=torch.tensor([[1, 2, 3]]))  # runs


def test_off_means_eager():
    model = tiny_model(seed=4)
    with compiled(model, False, "fp32", "cpu") as said:
        assert said == "eager"
        assert all(m._compiled_call_impl is None for m in hot_modules(model))
