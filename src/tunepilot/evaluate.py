"""Held-out loss and greedy exact match.

Eval loss uses the training loss function itself (one definition of the loss in the codebase),
over length-sorted batches so evaluation wastes little on padding.

In a distributed run the ranks share the work: each takes every world-th batch and the sums
are added over ranks, so N processes evaluate about N times faster than each doing everything.
A sharded model (FSDP2) gathers its weights inside every forward, so there every rank must run
as many batches as the busiest one: the ranks short of one run a blank batch (loss) or a
repeated one whose answers are dropped (generation, where transformers' ``synced_gpus`` keeps
the ranks stepping together until every rank's sequences are done).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tunepilot import distributed
from tunepilot.data.batching import collate, collate_prompts, length_sorted_batches
from tunepilot.data.tokenize import Tokenized
from tunepilot.train import frozen, projections
from tunepilot.train.step import DTYPES, autocast, loss_sum

#: widest generation batch. On a CPU every generated token reads every weight from memory
#: whatever the batch's width, so width is nearly free until the matmuls turn compute-bound:
#: the demo's 120 prompts took 22 s at 128 wide, 39 s at 32 (LoRA model, bf16)
GENERATION_WIDTH = 128
#: the share of the memory budget the KV cache of one generation batch may take
KV_SHARE = 0.25
#: generated tokens beyond the longest reference answer (exact_match's default budget)
ANSWER_SLACK = 8
#: characters kept from the end of a sample's prompt (the request, just before the answer)
PROMPT_TAIL = 400


@dataclass
class ExactMatch:
    accuracy: float
    correct: int | float  # a sum of scores when a custom scorer gives partial credit
    total: int
    samples: list[dict[str, Any]]  # a few (prompt, expected, generated) for the report

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "correct": self.correct,
            "total": self.total,
            "samples": self.samples,
        }


@torch.no_grad()
def eval_loss(
    model: nn.Module,
    examples: list[Tokenized],
    max_length: int,
    pad_id: int,
    batch_size: int,
    precision: str,
    device: str,
    max_tokens: int | None = None,
) -> float:
    """Mean loss per supervised token over the eval set, each example cut to ``max_length``;
    batches of at most ``batch_size`` rows and, given ``max_tokens``, that many padded tokens."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    lengths = [min(len(ex.input_ids), max_length) for ex in examples]
    batches = length_sorted_batches(lengths, batch_size, max_tokens)
    with _weights_cast_once(model, precision):
        for idx in _my_batches(batches, model):
            batch = collate([examples[j] for j in (idx or batches[0])], max_length, pad_id)
            if idx is None:
                batch = distributed.blank(batch)
            total += float(loss_sum(model, batch.to(device), precision, device))
            tokens += batch.supervised_tokens
    total, tokens = distributed.sum_over_ranks([total, tokens])
    model.train(was_training)
    return total / tokens if tokens else math.nan


def generation_batch(
    model: nn.Module, examples: list[Tokenized], precision: str, budget_gb: float
) -> int:
    """The widest generation batch, up to GENERATION_WIDTH, whose KV cache holds the longest
    prompt and the longest answer in KV_SHARE of the memory budget; in a distributed run no
    wider than each rank's share of the prompts, so that every rank has a batch to generate."""
    config = getattr(model.config, "text_config", None) or model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    per_token = config.num_hidden_layers * 2 * kv_heads * head_dim * DTYPES[precision].itemsize
    prompt = max((ex.prompt_length for ex in examples), default=0)
    answer = max((len(ex.input_ids) - ex.prompt_length for ex in examples), default=0)
    fits = int(budget_gb * KV_SHARE * 2**30) // (per_token * (prompt + answer + ANSWER_SLACK))
    share = -(-len(examples) // distributed.world()) if distributed.active() else len(examples)
    return max(1, min(GENERATION_WIDTH, fits, share))


@contextlib.contextmanager
def _weights_cast_once(model: nn.Module, precision: str) -> Iterator[None]:
    """Weights cast to the compute dtype once for the whole evaluation instead of at every
    batch, or every generated token: the frozen ones (train/frozen.py) and the trainable ones
    of layers that run as one matmul (train/projections.py); the same bf16 values."""
    if distributed.sharded(model):
        yield  # FSDP2 gathers and casts its shards itself
        return
    with frozen.kept_in(model, DTYPES[precision]), projections.weights_fixed():
        yield


def _my_batches(batches: list[list[int]], model: nn.Module) -> list[list[int] | None]:
    """This rank's batches: every world-th, so each rank gets short and long ones alike.

    For a sharded model the list is topped up with None (run something, count nothing) to the
    busiest rank's length.
    """
    if not distributed.active():
        return list(batches)
    mine: list[list[int] | None] = list(batches[distributed.rank() :: distributed.world()])
    if distributed.sharded(model):
        mine += [None] * (-(-len(batches) // distributed.world()) - len(mine))
    return mine


@torch.no_grad()
def exact_match(
    model: nn.Module,
    tokenizer: Any,
    examples: list[Tokenized],
    batch_size: int,
    precision: str,
    device: str,
    max_new_tokens: int | None = None,
    n_samples: int = 5,
    scorer: Callable[[str, str], float] | None = None,
) -> ExactMatch | None:
    """Greedy generation from each prompt, compared with the reference answer (stripped).

    ``scorer(expected, generated)`` replaces the comparison with a score in [0, 1] (accuracy is
    then the mean score). None when the data has no reference answers (plain text).
    """
    cases = [ex for ex in examples if ex.answer is not None]
    if not cases:
        return None
    if max_new_tokens is None:
        longest = max(
            len(tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) for ex in cases
        )
        max_new_tokens = longest + ANSWER_SLACK
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id
    correct, samples = 0, []
    batches = length_sorted_batches([ex.prompt_length for ex in cases], batch_size)
    # the weights cast once for all the batches, not once per batch
    with _weights_cast_once(model, precision):
        for idx in _my_batches(batches, model):
            prompts = [cases[i].input_ids[: cases[i].prompt_length] for i in idx or batches[0]]
            input_ids, attention = collate_prompts(prompts, pad_id)
            with autocast(precision, device):
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad_id,
                    eos_token_id=tokenizer.eos_token_id,
                    use_cache=True,
                )
            if idx is None:
                continue  # generated only to keep a sharded model's ranks in step
            texts = tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)
            for i, text in zip(idx, texts, strict=True):
                if scorer is None:
                    ok = text.strip() == cases[i].answer.strip()
                    correct += ok
                else:
                    score = scorer(cases[i].answer, text)
                    ok = score >= 1.0
                    correct += score
                if len(samples) < n_samples:
                    samples.append(
                        {
                            "where": cases[i].where,
                            "prompt": _prompt_tail(tokenizer, cases[i]),
                            "expected": cases[i].answer,
                            "generated": text.strip(),
                            "correct": ok,
                        }
                        | ({"score": score} if scorer is not None else {})
                    )
    model.train(was_training)
    (correct,) = distributed.sum_over_ranks([correct])
    samples = [s for share in distributed.gather_objects(samples) for s in share][:n_samples]
    return ExactMatch(correct / len(cases), correct, len(cases), samples)


def _prompt_tail(tokenizer: Any, example: Tokenized) -> str:
    """The end of the prompt as the model saw it, chat template and special tokens included:
    the request an answer is judged against, and the template that framed it."""
    text = tokenizer.decode(example.input_ids[: example.prompt_length], skip_special_tokens=False)
    return text if len(text) <= PROMPT_TAIL else "…" + text[-PROMPT_TAIL:]
