"""One optimizer step: the loss, its normalisation across micro-batches, and the update.

The loss of a step is the *sum* of token losses over every micro-batch divided by the number of
supervised tokens in the whole step. Averaging per micro-batch and dividing by the accumulation
count (what most loops do) weights a token in a short micro-batch more than one in a long
micro-batch, so micro-batch 2 x 4 would not equal 8 x 1. Here it does, exactly.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunepilot import distributed
from tunepilot import model as models
from tunepilot.data.batching import IGNORE, Batch
from tunepilot.errors import RunError
from tunepilot.train import attention, frozen
from tunepilot.train.cross_entropy import linear_cross_entropy

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=DTYPES[precision])


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, lm_head) when logits are a plain projection of the last hidden state."""
    if distributed.sharded(model):
        return None  # FSDP gathers the root's weights (embeddings, head) in the model's forward
    base = models.base_model(model)
    config = base.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None  # logits need the model's own post-processing
    try:
        return base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def loss_sum(model: nn.Module, batch: Batch, precision: str, device: str) -> torch.Tensor:
    """Sum of next-token cross-entropy over supervised tokens, computed in fp32.

    Logits are computed only at supervised positions, and for a plain output projection never
    whole (train/cross_entropy.py): for a 49k vocabulary the full [batch, length, vocab] fp32
    tensor is otherwise the largest allocation of the whole step. Where the model's own forward
    must run (an FSDP2-sharded model gathers its head there; soft-capped logits), it is asked
    for logits at the positions some row supervises only (transformers' ``logits_to_keep``).
    """
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE
    parts = _parts(model)
    inputs = model_inputs(batch)
    if batch.packed and attention.skips_packed_mask(model):
        inputs["attention_mask"] = attention.NO_MASK
    with autocast(precision, device):
        if parts is None and _keeps_logits(model):
            positions = keep.any(dim=0).nonzero().squeeze(1)
            logits = model(**inputs, logits_to_keep=positions).logits[keep[:, positions]]
        elif parts is None:
            logits = model(**inputs).logits[:, :-1][keep]
        else:
            decoder, head = parts
            hidden = decoder(**inputs).last_hidden_state[:, :-1][keep]
            if _fusable(head):
                return linear_cross_entropy(hidden, head.weight, targets[keep])
            logits = head(hidden)
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


def _keeps_logits(model: nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs do)."""
    base = models.base_model(model)
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _fusable(head: nn.Module) -> bool:
    """A plain bias-free projection whose weight is a local tensor (not an FSDP shard, not a
    LoRA-wrapped head): its logits can be fused with the loss and never held whole."""
    return (
        type(head) is nn.Linear
        and head.bias is None
        and type(head.weight) in (torch.Tensor, nn.Parameter)
    )


def model_inputs(batch: Batch) -> dict[str, Any]:
    """Forward arguments. ``use_cache=False`` always: with a cache, transformers 5 ignores the
    per-sequence position ids of a packed row and its sequences silently attend to each other."""
    if not batch.packed:
        return {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "use_cache": False,
        }
    longest = int((batch.cu_seq_lens[1:] - batch.cu_seq_lens[:-1]).max())
    return {
        "input_ids": batch.input_ids,
        "position_ids": batch.position_ids,
        "use_cache": False,
        # the varlen arguments of transformers' flash-attention path; packed_sdpa reads them too
        "cu_seq_lens_q": batch.cu_seq_lens,
        "cu_seq_lens_k": batch.cu_seq_lens,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def accumulate(
    model: nn.Module,
    micro_batches: list[Batch],
    precision: str,
    device: str,
    scaler: torch.amp.GradScaler | None,
    normaliser: int | None = None,
    replica: distributed.Replica | None = None,
) -> tuple[float, int]:
    """Forward + backward over one step's micro-batches; gradients sum to the step's mean loss.

    In a distributed run these micro-batches are one rank's slice of the step: ``normaliser``
    is the supervised tokens of the whole step (all ranks), and ``replica`` the DDP/FSDP wrapper
    every forward goes through, so that the gradients summed over ranks are the step's.

    Returns (this slice's share of the mean loss per supervised token, the normaliser); alone,
    that is the step's loss and supervised tokens.
    """
    total_tokens = sum(b.supervised_tokens for b in micro_batches)
    if normaliser is not None:
        total_tokens = normaliser
    run = replica or distributed.Replica(model, "single")
    if not distributed.sharded(model):
        frozen.match(model, DTYPES[precision])  # once per precision, not per micro-batch
    total_loss = torch.zeros((), device=device)  # read once per step: one host-device sync
    for i, batch in enumerate(micro_batches):
        with run.micro_batch(last=i == len(micro_batches) - 1):
            loss = run.loss(loss_sum, batch.to(device), precision, device) / max(total_tokens, 1)
            if not loss.requires_grad:
                raise RunError(
                    "the loss does not depend on any trainable parameter, so nothing can train; "
                    "usual causes: reentrant gradient checkpointing with frozen inputs, or every "
                    "parameter frozen; check train.gradient_checkpointing and lora.target_modules"
                )
            (scaler.scale(loss) if scaler else loss).backward()
        total_loss += loss.detach()
    return float(total_loss), total_tokens


def clip(
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    max_grad_norm: float,
) -> float:
    """Unscale (fp16) and clip the gradients; return the pre-clipping global norm.

    Called before the step is applied, so the guardian can judge the norm first.
    """
    if scaler:
        scaler.unscale_(optimizer)
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    return float(torch.nn.utils.clip_grad_norm_(params, limit))


def apply(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
) -> None:
    """Step, schedule, zero. With a scaler, a step with inf gradients is skipped by the scaler."""
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def update(
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    max_grad_norm: float,
) -> float:
    """Clip then apply, for callers without a guardian. Returns the pre-clipping norm."""
    norm = clip(params, optimizer, scaler, max_grad_norm)
    apply(optimizer, scheduler, scaler)
    return norm


def rescale_lr(
    optimizer: torch.optim.Optimizer, scheduler: Any, base_lr: float, scale: float
) -> None:
    """Scale the whole schedule (the guardian halves it after a rollback), effective now."""
    scheduler.base_lrs = [base_lr * scale for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["lr"] = base_lr * scale * factor(scheduler.last_epoch)


def make_scaler(precision: str, device: str) -> torch.amp.GradScaler | None:
    # fp16 needs loss scaling to keep small gradients from flushing to zero; bf16 does not
    return torch.amp.GradScaler(device) if precision == "fp16" else None
