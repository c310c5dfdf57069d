"""Tokenized examples -> padded tensors, and the order examples are visited in.

Right padding for training (the causal mask then keeps real tokens from ever seeing pads), left
padding for batched generation (so every prompt ends where generation starts). Batches are padded
to the longest member, rounded up to a multiple of 8 for tensor-core/vector-friendly shapes.
Truncation happens here and nowhere else, and the planner reports how much it will cut.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from tunepilot.data.tokenize import Tokenized

IGNORE = -100
PAD_MULTIPLE = 8


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor | None  # [B, L], 1 on real tokens; None for a packed row
    labels: torch.Tensor  # [B, L], IGNORE where no loss; HF convention (shifted in the loss)
    supervised_tokens: int  # number of labels that carry loss
    real_tokens: int
    padded_tokens: int  # B * L, real + pad
    # packed rows only: positions restart at 0 per sequence; cu_seq_lens are the boundaries
    position_ids: torch.Tensor | None = None  # [1, T]
    cu_seq_lens: torch.Tensor | None = None  # [n_sequences + 1], int32

    @property
    def packed(self) -> bool:
        return self.cu_seq_lens is not None

    def to(self, device: torch.device | str) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Batch(
            self.input_ids.to(device),
            move(self.attention_mask),
            self.labels.to(device),
            self.supervised_tokens,
            self.real_tokens,
            self.padded_tokens,
            move(self.position_ids),
            move(self.cu_seq_lens),
        )


def round_up(n: int, multiple: int = PAD_MULTIPLE) -> int:
    return max(multiple, math.ceil(n / multiple) * multiple)


def collate(examples: list[Tokenized], max_length: int, pad_id: int) -> Batch:
    """Right-pad a micro-batch, truncating each example to ``max_length`` tokens."""
    rows = [(ex.input_ids[:max_length], ex.loss_mask[:max_length]) for ex in examples]
    width = min(round_up(max(len(ids) for ids, _ in rows)), round_up(max_length))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        n = len(ids)
        input_ids[i, :n] = torch.tensor(ids)
        attention[i, :n] = 1  # from the length, never from comparing ids with pad_id
        labels[i, :n] = torch.where(torch.tensor(mask), torch.tensor(ids), IGNORE)
    labels[:, 0] = IGNORE  # nothing predicts the first token
    real = int(attention.sum())
    return Batch(
        input_ids, attention, labels, int((labels != IGNORE).sum()), real, input_ids.numel()
    )


def pack(examples: list[Tokenized], max_length: int) -> Batch:
    """One row, no padding: the examples back to back, each truncated to ``max_length``.

    Position ids restart at 0 for every example and ``cu_seq_lens`` marks the boundaries, so
    packed attention keeps each example to itself; the first token of every example carries no
    label, so no loss ever crosses a boundary. Exactly the loss of padding them, without pads.
    """
    rows = [(ex.input_ids[:max_length], ex.loss_mask[:max_length]) for ex in examples]
    ids = torch.tensor([t for r, _ in rows for t in r], dtype=torch.long)
    keep = torch.tensor([m for _, mask in rows for m in mask], dtype=torch.bool)
    lengths = torch.tensor([len(r) for r, _ in rows])
    starts = torch.cumsum(lengths, 0) - lengths
    positions = torch.arange(len(ids)) - torch.repeat_interleave(starts, lengths)
    labels = torch.where(keep, ids, IGNORE)
    labels[starts] = IGNORE  # nothing predicts a sequence's first token
    bounds = torch.zeros(len(rows) + 1, dtype=torch.int32)
    bounds[1:] = torch.cumsum(lengths, 0)
    n = len(ids)
    return Batch(
        ids[None],
        None,
        labels[None],
        int((labels != IGNORE).sum()),
        n,
        n,
        positions[None],
        bounds,
    )


def token_bins(lengths: list[int], budget: int) -> list[list[int]]:
    """Group positions 0..n-1 into micro-batches of at most ``budget`` tokens each.

    First-fit decreasing: the fewest, fullest packed rows (each costs a pass through the
    model). Order inside a step does not change the step's loss, which is normalised by the
    step's supervised tokens, not per micro-batch. An example longer than the budget gets a
    row of its own.
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return [sorted(b) for b in bins]


def collate_prompts(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for batched generation: (input_ids, attention_mask)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        attention[i, width - len(ids) :] = 1
    return input_ids, attention


def steps_per_epoch(n_examples: int, global_batch_size: int) -> int:
    """Optimizer steps in one pass; a final partial batch is kept (token-normalised loss makes
    a smaller batch harmless), so no example is silently dropped."""
    return math.ceil(n_examples / global_batch_size)


def epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    """A fresh, reproducible shuffle per epoch."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_examples, generator=generator).tolist()


@functools.lru_cache(maxsize=2)
def _order(n_examples: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(epoch_order(n_examples, seed, epoch))


def global_batch_at(
    position: int, n_examples: int, global_batch_size: int, seed: int
) -> tuple[int, list[int]]:
    """(epoch, example indices) of the ``position``-th global batch of the data stream.

    The stream is a pure function of (seed, position): resuming, rolling back and replaying
    need only the position, and every process computes the same batches.
    """
    per_epoch = steps_per_epoch(n_examples, global_batch_size)
    epoch, index = divmod(position, per_epoch)
    order = _order(n_examples, seed, epoch)
    return epoch, list(order[index * global_batch_size : (index + 1) * global_batch_size])


def split(indices: list[int], micro_batch_size: int) -> list[list[int]]:
    return [indices[i : i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]


def micro_batches(
    examples: list[Tokenized], micro_batch_size: int, max_length: int, pad_id: int, packing: bool
) -> list[Batch]:
    """One step's examples as micro-batches.

    Packed: rows of at most ``micro_batch_size * max_length`` tokens (the memory the plan sized a
    micro-batch for), filled first-fit decreasing. Padded: sorted by length first, so examples
    of similar length share a micro-batch and pad each other little. Either way the step's
    loss is the same (it is normalised over the whole step), only the waste differs.
    """
    lengths = [min(len(ex.input_ids), max_length) for ex in examples]
    if packing:
        groups = token_bins(lengths, micro_batch_size * max_length)
        return [pack([examples[i] for i in g], max_length) for g in groups]
    order = sorted(range(len(examples)), key=lambda i: lengths[i])
    return [
        collate([examples[i] for i in g], max_length, pad_id)
        for g in split(order, micro_batch_size)
    ]


def length_sorted_batches(
    lengths: list[int], batch_size: int, max_tokens: int | None = None
) -> list[list[int]]:
    """Indices grouped by similar length: for evaluation, where order does not matter.

    ``max_tokens``: a batch also closes before its rows x its longest length (what padding
    makes of it) would pass this, so long examples go a few at a time, and alone when even
    one is longer."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if max_tokens is None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    for i in order:
        rows = len(batches[-1]) if batches else batch_size
        if rows < batch_size and (rows + 1) * lengths[i] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches
