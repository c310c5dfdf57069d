"""Evaluation shared between ranks: each rank scores every world-th batch, the sums are added.

The ranks are simulated in one process (rank, world and the collectives patched); the
two-process runs in test_distributed.py check that the shared result equals one process's.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from tests.conftest import tiny_model, tokenized_chat, with_live_lora
from tunepilot import distributed, evaluate
from tunepilot.data.tokenize import Tokenized
from tunepilot.train import frozen, projections
from tunepilot.train.projections import share_inputs

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
    # each sample shows the end of its prompt as the model saw it, up to the generation prompt
    by_where = {ex.where: ex for ex in examples}
    for sample in result.samples:
        ex = by_where[sample["where"]]
        rendered = tokenizer.decode(ex.input_ids[: ex.prompt_length], skip_special_tokens=False)
        assert rendered.endswith(sample["prompt"].lstrip("…"))
        assert sample["prompt"].endswith("<|im_start|>assistant\n")
        assert len(sample["prompt"]) <= evaluate.PROMPT_TAIL + 1


def frozen_weights(model) -> list:
    return [p for n, p in model.named_parameters() if not p.requires_grad and "proj" in n]


def test_evaluation_casts_the_frozen_weights_once_computes_the_same_and_gives_them_back(
    monkeypatch, examples, tokenizer
):
    """Under autocast an uncached weight is cast again for every batch and every generated
    token; evaluation casts a LoRA model's frozen base once instead (train/frozen.py), with
    the same bf16 values, so the same loss and the same answers, and leaves fp32 behind."""
    plain = with_live_lora(tiny_model(seed=2), 0.1)
    cast = copy.deepcopy(plain)
    before = [(w.data_ptr(), w.dtype) for w in frozen_weights(cast)]
    during: list[set] = []
    real = cast.generate

    def generate(**kwargs):
        base = cast.get_base_model()
        head, embeddings = base.lm_head.weight, base.model.embed_tokens.weight
        during.append({w.dtype for w in frozen_weights(cast)})
        # the tied output head reads a bf16 copy; the embeddings stay fp32
        during.append({head.dtype, head is not embeddings, embeddings.dtype})
        return real(**kwargs)

    monkeypatch.setattr(cast, "generate", generate)
    tokenizer.padding_side = "left"
    got = (
        evaluate.eval_loss(cast, examples, 256, tokenizer.pad_token_id, BATCH, "bf16", "cpu"),
        evaluate.exact_match(cast, tokenizer, examples, 4, "bf16", "cpu", max_new_tokens=3),
    )
    assert during and all(d == {torch.bfloat16} for d in during[::2])
    assert all(d == {torch.bfloat16, True, torch.float32} for d in during[1::2])
    assert [(w.data_ptr(), w.dtype) for w in frozen_weights(cast)] == before  # the originals
    base = cast.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight  # tied again
    with monkeypatch.context() as m:
        m.setattr(frozen, "match", lambda model, dtype: None)  # autocast casts every time
        m.setattr(frozen, "_frozen_tied_head", lambda model: None)
        want = (
            evaluate.eval_loss(plain, examples, 256, tokenizer.pad_token_id, BATCH, "bf16", "cpu"),
            evaluate.exact_match(plain, tokenizer, examples, 4, "bf16", "cpu", max_new_tokens=3),
        )
    assert got[0] == want[0]
    assert [s["generated"] for s in got[1].samples] == [s["generated"] for s in want[1].samples]

    # while training, the weights are already bf16 and stay so after an evaluation
    frozen.match(cast, torch.bfloat16)
    evaluate.eval_loss(cast, examples, 256, tokenizer.pad_token_id, BATCH, "bf16", "cpu")
    assert {w.dtype for w in frozen_weights(cast)} == {torch.bfloat16}


def test_generation_batch_is_as_wide_as_its_kv_cache_allows():
    model = tiny_model()
    config = model.config
    kv = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    per_token = config.num_hidden_layers * 2 * kv * 2  # bf16 keys and values, every layer
    examples = [
        Tokenized([1] * 30, [True] * 30, 20, "a", "x:0"),  # the longest prompt
        Tokenized([1] * 25, [True] * 25, 5, "b", "x:1"),  # the longest answer: 20 tokens
    ] * 100
    longest = 20 + 20 + evaluate.ANSWER_SLACK
    wide = evaluate.generation_batch(model, examples, "bf16", 100.0)
    assert wide == evaluate.GENERATION_WIDTH
    for width in (1, 7, 64):
        budget = (width + 0.5) * longest * per_token / evaluate.KV_SHARE / 2**30
        assert evaluate.generation_batch(model, examples, "bf16", budget) == width
        assert evaluate.generation_batch(model, examples, "fp32", budget) == max(1, width // 2)
    assert evaluate.generation_batch(model, examples, "bf16", 0.0) == 1


def test_generation_batch_leaves_every_rank_a_share(monkeypatch, tokenizer):
    """120 prompts 128 wide would be one batch, generated by rank 0 while rank 1 waits."""
    many = tokenized_chat(tokenizer, 120, seed=1)
    model = tiny_model()
    assert evaluate.generation_batch(model, many, "bf16", 100.0) == 120  # no wider than the set
    as_rank(monkeypatch, 0, 2)
    assert evaluate.generation_batch(model, many, "bf16", 100.0) == 60
    assert evaluate.generation_batch(model, many[:7], "bf16", 100.0) == 4


def test_a_full_fine_tunes_grouped_weights_are_joined_once_per_evaluation(
    monkeypatch, examples, tokenizer
):
    """Generation joins a full fine-tune's grouped trainable weights once, not at every
    generated token (train/projections.py), with the same answers, and leaves nothing cached."""
    model = tiny_model(seed=2)
    share_inputs(model, torch.arange(4).unsqueeze(0))
    joins = []
    real = projections._joined
    monkeypatch.setattr(projections, "_joined", lambda *a: joins.append(1) or real(*a))
    tokenizer.padding_side = "left"

    def answers() -> list[str]:
        em = evaluate.exact_match(model, tokenizer, examples, 16, "bf16", "cpu", max_new_tokens=4)
        return [s["generated"] for s in em.samples]

    got = answers()
    assert len(joins) == 2 * model.config.num_hidden_layers  # one batch: once per group
    assert projections._fixed is None
    with monkeypatch.context() as m:
        m.setattr(projections, "weights_fixed", contextlib.nullcontext)
        joins.clear()
        want = answers()
    assert len(joins) > 2 * model.config.num_hidden_layers  # again at every generated token
    assert got == want


def test_eval_batches_keep_to_a_token_budget_and_cover_every_example_once():
    """Long eval examples go a few at a time (alone when one is over the budget), short ones
    up to the row limit: padded rows x longest never pass the budget but for a lone example."""
    from tunepilot.data.batching import length_sorted_batches

    lengths = [30, 500, 40, 2000, 35, 260, 250, 31, 33, 600]
    batches = length_sorted_batches(lengths, 4, max_tokens=1024)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) <= 4 and (len(b) * longest <= 1024 or len(b) == 1)
    assert [sorted(lengths[i] for i in b) for b in batches] == [
        [30, 31, 33, 35],
        [40, 250, 260],
        [500],
        [600],
        [2000],
    ]
    assert length_sorted_batches(lengths, 4) == length_sorted_batches(lengths, 4, None)
