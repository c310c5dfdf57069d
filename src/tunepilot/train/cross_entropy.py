"""The output projection and cross-entropy, fused and chunked.

For a 49k vocabulary the logits of a step are the biggest tensors in training: N supervised
positions x 49,152 x 4 bytes (fp32 for a stable softmax) = 197 MB per 1,000 tokens, plus the
same again for their gradient, plus the low-precision copy. Here the logits exist one chunk at
a time: each chunk's loss *and* its gradients (softmax - one-hot, pushed through the projection)
are computed in the forward pass, and backward only scales the stored gradients. Nothing is
recomputed, so it costs the same matmuls as the plain path while peak memory no longer grows
with the vocabulary x tokens product.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F

from tunepilot.train.matmul import mm

CHUNK = 256  # positions per chunk: 256 x 49,152 fp32 logits = 50 MB, the peak for logits (1024
# measured ~0.15 GB more peak RSS on a full fine-tune and no faster)
WEIGHT_BLOCK_BYTES = 100 * 2**20  # softmax gradients held for one weight-gradient matmul:
# accumulating a [vocab, hidden] gradient is a full pass over 113 MB (fp32, 49k vocabulary) per
# matmul, which cost more than the matmul itself when done per 256-row chunk


_cast: tuple[weakref.ref, tuple, torch.Tensor] | None = None


def in_dtype(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight.to(dtype)``; for a frozen weight, cast once rather than once per micro-batch.

    A tied output head is also the embedding table, so it stays fp32 under bf16 (train/frozen.py
    leaves it) and every micro-batch would cast all of it: 28M values, ~55 ms per micro-batch on
    the benchmark CPU. A LoRA run's head never trains, so its cast is kept (one copy, dropped
    with the weight it was cast from). It is cast again if its storage is replaced or its
    version changes (a checkpoint restored into it). A trained head is cast on every call: fused
    AdamW updates parameters in place without bumping their version counter, so no cheap test
    tells that its values changed.
    """
    global _cast
    if weight.dtype == dtype:
        return weight
    if weight.requires_grad:
        return weight.detach().to(dtype)
    key = (weight._version, weight.data_ptr(), dtype, weight.device)
    if _cast is None or _cast[0]() is not weight or _cast[1] != key:
        _cast = None  # the old copy goes before the new one is made
        _cast = (weakref.ref(weight, _forget), key, weight.detach().to(dtype))
    return _cast[2]


def _forget(dead: weakref.ref) -> None:
    global _cast
    if _cast is not None and _cast[0] is dead:
        _cast = None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        dtype: torch.dtype,
        chunk: int,
        weight_block_bytes: int,
    ) -> torch.Tensor:
        w = in_dtype(weight, dtype)
        rows = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            # softmax gradients (and their inputs) wait here, block rows at a time, so the
            # weight gradient takes one matmul and one accumulation per block, not per chunk
            fit = weight_block_bytes // (weight.shape[0] * w.element_size()) // chunk * chunk
            block = min(max(chunk, fit), rows)
            pending = torch.empty(block, weight.shape[0], dtype=dtype, device=hidden.device)
            pending_h = torch.empty(block, hidden.shape[1], dtype=dtype, device=hidden.device)
            filled = 0
        elif grad_hidden is not None:  # one chunk's softmax gradients, in the matmul dtype
            scratch = torch.empty(
                min(chunk, rows), weight.shape[0], dtype=dtype, device=hidden.device
            )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows, chunk):
            h = hidden[start : start + chunk].to(dtype)
            t = targets[start : start + chunk]
            n = len(t)
            logits = mm(h, w.T)  # in the matmul dtype, as nn.Linear under autocast gives them
            # the loss in fp32 from the targets' log-probabilities (log_softmax computes each
            # row's max and sum of exponentials in fp32)
            log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
            picked = log_probs.gather(1, t[:, None]).squeeze(1)
            del log_probs
            total -= picked.sum()
            if grad_hidden is None and not ctx.needs_input_grad[1]:
                continue  # evaluation: the loss is all
            # d(loss)/d(logits) = softmax - one_hot. The softmax is written straight in the
            # matmul dtype (computed in fp32 inside the kernel, rounded once): on CPU the bf16
            # kernel takes 4 ms for 256 x 49,152 where any pass through fp32 logits takes
            # 11-33 ms. The targets' entries p - 1 come from the fp32 log-probabilities (expm1):
            # p rounded to bf16 near 1, then lowered by 1, would keep few of the digits that matter
            if ctx.needs_input_grad[1]:
                grad = pending[filled : filled + n]
                pending_h[filled : filled + n] = h
                filled += n
            else:
                grad = scratch[:n]
            torch.softmax(logits, dim=-1, out=grad)
            grad[torch.arange(n, device=t.device), t] = torch.expm1(picked).to(dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = mm(grad, w).to(hidden.dtype)
            if ctx.needs_input_grad[1] and (filled == block or start + chunk >= rows):
                part = mm(pending[:filled].T, pending_h[:filled])
                if grad_weight is None:
                    grad_weight = part.to(torch.float32)
                else:
                    grad_weight.add_(part)  # mixed dtypes add in one pass, no fp32 copy
                filled = 0
        ctx.save_for_backward(
            grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype)
        )
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        # the stored gradients are this function's own: scaled in place, no second copy of a
        # [vocab, hidden] tensor (backward runs once; the graph is not retained)
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = None if grad_hidden is None else grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
        gw = None if grad_weight is None else grad_weight.mul_(grad_output.to(grad_weight.dtype))
        return gh, gw, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = CHUNK,
    weight_block_bytes: int = WEIGHT_BLOCK_BYTES,
) -> torch.Tensor:
    """Sum over rows of cross_entropy(hidden @ weight.T, targets), in chunks; fp32 softmax.

    The projection runs in the autocast dtype when autocast is on (as ``nn.Linear`` would).
    """
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    if hidden.shape[0] == 0:
        return (hidden.sum() + weight.sum()) * 0.0  # keeps the graph; no supervised tokens
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, dtype, chunk, weight_block_bytes)


def plain_cross_entropy(
    hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor
) -> torch.Tensor:
    """The reference: full logits, then fp32 cross-entropy (used where fusion cannot apply)."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")
