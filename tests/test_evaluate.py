"""Evaluation shared between ranks: each rank scores every world-th batch, the sums are added.

The ranks are simulated in one process (rank, world and the collectives patched); the
two-process runs in test_distributed.py check that the shared result equals one process's.
"""

from __future__ import annotations

import pytest

from tests.conftest import tiny_model, tokenized_chat
from tunepilot import distributed, evaluate

BATCH = 2


@pytest.fixture
def examples(tokenizer):
    return tokenized_chat(tokenizer, 10, seed=5)


def as_rank(monkeypatch, rank: int, world: int, sharded: bool = False) -> list[list]:
    """Make this process rank ``rank`` of ``world``; returns what it hands to the sum."""
    sums: list[list] = []
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "world", lambda: world)
    monkeypatch.setattr(distributed, "sharded", lambda model: sharded)
    # the other ranks add nothing here: each rank's own share comes back, recorded
    monkeypatch.setattr(distributed, "sum_over_ranks", lambda values: sums.append(values) or values)
    monkeypatch.setattr(distributed, "gather_objects", lambda value: [value])
    return sums


def loss(model, examples, pad_id: int) -> float:
    return evaluate.eval_loss(model, examples, 256, pad_id, BATCH, "fp32", "cpu")


def test_eval_loss_ranks_score_disjoint_shares_that_add_up_to_the_whole(
    monkeypatch, examples, tokenizer
):
    model = tiny_model(seed=2)
    pad = tokenizer.pad_token_id
    alone = loss(model, examples, pad)
    shares = []
    for rank in (0, 1):
        with monkeypatch.context() as m:
            sums = as_rank(m, rank, 2)
            loss(model, examples, pad)
        (share,) = sums
        shares.append(share)
    total = sum(e.supervised for e in examples)
    assert 0 < shares[0][1] < total and 0 < shares[1][1] < total
    assert shares[0][1] + shares[1][1] == total
    together = (shares[0][0] + shares[1][0]) / total
    assert together == pytest.approx(alone, rel=1e-5)


def test_a_sharded_model_runs_as_many_forwards_on_every_rank(monkeypatch, examples, tokenizer):
    """5 batches over 2 ranks: rank 1 scores 2 and runs a blank third, as rank 0 runs 3."""
    model = tiny_model(seed=2)
    calls = []
    real = evaluate.loss_sum
    monkeypatch.setattr(
        evaluate, "loss_sum", lambda *a: calls.append(a[1].supervised_tokens) or real(*a)
    )
    sums = as_rank(monkeypatch, 1, 2, sharded=True)
    loss(model, examples, tokenizer.pad_token_id)
    assert len(calls) == 3 and calls[-1] == 0  # the blank one carries no loss
    assert sums[0][1] == sum(calls)


def generated_prompts(monkeypatch, model) -> list[int]:
    """Patches ``model.generate`` to record how many prompts each call was given."""
    seen: list[int] = []
    real = model.generate

    def generate(**kwargs):
        seen.append(kwargs["input_ids"].shape[0])
        return real(**kwargs)

    monkeypatch.setattr(model, "generate", generate)
    return seen


@pytest.mark.parametrize("sharded", [False, True])
def test_exact_match_ranks_generate_disjoint_shares(
    monkeypatch, examples, tokenizer, sharded: bool
):
    """5 batches of 2 prompts over 2 ranks: rank 0 answers 6, rank 1 answers 4; for a sharded
    model rank 1 also generates a third batch, dropped, to keep step with rank 0."""
    model = tiny_model(seed=2)
    per_rank, answered = [], []
    for rank in (0, 1):
        with monkeypatch.context() as m:
            seen = generated_prompts(m, model)
            sums = as_rank(m, rank, 2, sharded=sharded)
            result = evaluate.exact_match(
                model, tokenizer, examples, BATCH, "fp32", "cpu", max_new_tokens=2, n_samples=10
            )
        assert result.total == len(examples)
        assert len(sums) == 1  # the correct answers are summed over ranks
        per_rank.append(sum(seen))
        answered.append({s["where"] for s in result.samples})
    assert per_rank == ([6, 6] if sharded else [6, 4])
    assert len(answered[0]) == 6 and len(answered[1]) == 4
    assert answered[0].isdisjoint(answered[1])


def test_alone_nothing_is_shared(monkeypatch, examples, tokenizer):
    model = tiny_model(seed=2)
    seen = generated_prompts(monkeypatch, model)
    assert not distributed.active()
    result = evaluate.exact_match(
        model, tokenizer, examples, BATCH, "fp32", "cpu", max_new_tokens=2
    )
    assert sum(seen) == result.total == len(examples) and len(result.samples) == 5
