"""``tunepilot eval``: held-out loss, perplexity and greedy exact match of a model on a data file.

The file goes through the training pipeline (sources -> formats -> chat template and loss mask),
so "loss" means exactly what it means during training: mean cross-entropy per supervised token,
computed by ``evaluate.eval_loss``. Generation is batched with left padding by
``evaluate.exact_match``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from tunepilot import hardware
from tunepilot.data.batching import round_up
from tunepilot.data.formats import detect_format, to_examples
from tunepilot.data.sources import read_rows
from tunepilot.data.tokenize import tokenize_examples
from tunepilot.errors import UserError
from tunepilot.evaluate import ExactMatch, eval_loss, exact_match, generation_batch
from tunepilot.inference import context_length, load_for_inference, load_tokenizer
from tunepilot.plan.memory import budget_gb
from tunepilot.scoring import Scorer

#: the loss's batch when none is given: a forward without gradients is compute-bound from
#: a few rows on, so wider batches only add memory
LOSS_BATCH = 8


@dataclass
class FileEval:
    examples: int
    data_format: str
    supervised_tokens: int
    truncated_examples: int  # longer than the model's context: scored on their first part only
    loss: float
    exact: ExactMatch | None
    device: str
    precision: str
    seconds: float

    @property
    def perplexity(self) -> float:
        # exp of a large loss overflows and means nothing anyway
        return math.exp(self.loss) if math.isfinite(self.loss) and self.loss < 50 else math.inf


def evaluate_file(
    target: str,
    data: str,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    scorer: Scorer | None = None,
    data_format: str = "auto",
    n_samples: int = 5,
) -> FileEval:
    """Evaluate ``target`` (run directory or model) on ``data``; the data is checked before any
    weights are loaded, so a bad file fails in a second.

    ``batch_size``: for the loss and for generation; None is 8 for the loss and, for generation,
    as wide as memory allows (evaluate.generation_batch).
    """
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if not Path(data).exists():
        raise UserError(f"--data {data}: no such file")
    start = time.perf_counter()
    tokenizer = load_tokenizer(target)
    rows = read_rows(data)
    fmt = detect_format(rows, data) if data_format == "auto" else data_format
    tokenized = tokenize_examples(to_examples(rows, fmt), tokenizer)
    supervised = sum(t.supervised for t in tokenized)
    if supervised == 0:
        raise UserError(f"{data}: no tokens to score (no assistant answers or text)")
    loaded = load_for_inference(target, tokenizer)
    context = context_length(loaded.model)
    max_length = min(context, round_up(max(len(t.input_ids) for t in tokenized)))
    args = (loaded.precision, loaded.device)
    loss_batch = batch_size or LOSS_BATCH
    loss = eval_loss(loaded.model, tokenized, max_length, tokenizer.pad_token_id, loss_batch, *args)
    width = batch_size or generation_batch(
        loaded.model, tokenized, loaded.precision, budget_gb(hardware.detect().memory_available_gb)
    )
    em = exact_match(
        loaded.model,
        tokenizer,
        tokenized,
        width,
        *args,
        max_new_tokens=max_new_tokens,
        n_samples=n_samples,
        scorer=scorer,
    )
    return FileEval(
        examples=len(tokenized),
        data_format=fmt,
        supervised_tokens=supervised,
        truncated_examples=sum(len(t.input_ids) > context for t in tokenized),
        loss=loss,
        exact=em,
        device=loaded.device,
        precision=loaded.precision,
        seconds=time.perf_counter() - start,
    )
