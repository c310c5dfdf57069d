"""Frozen weights kept in the autocast dtype while a run computes in bf16 or fp16.

Under autocast every ``nn.Linear`` casts its fp32 weight to bf16 on every forward, and for
weights that need no gradient autocast does not cache the cast: a LoRA run re-casts the whole
frozen base model for every micro-batch. Those weights never change, so casting them once gives
bit-identical results (autocast would produce exactly these bf16 tensors) without the repeated
copies: measured +5-10% tokens/s for LoRA at bf16 on CPU, and the bf16 copies saved for
backward no longer come on top of the fp32 weights.

The fp32 originals are kept aside and put back whenever the run computes in fp32 (the
guardian's precision fallback) and when training ends: merging adapters into rounded base
weights would lose precision, and code outside autocast needs fp32 weights.

For the same reason LoRA layers stop casting their input to the adapter's dtype meanwhile: peft
turns a bf16 input (what o_proj and down_proj receive) into fp32 for the fp32 adapter, and
autocast turns it straight back into the same bf16 values for the matmul: two copies forward
and two backward per adapted layer, for nothing. Together with the cached cast of a tied head
(train/cross_entropy.py) that took 5.7% off a LoRA forward + backward at bf16 on the benchmark
CPU (SmolLM2-135M, packed steps of 8 long-tailed examples, both ways interleaved in one process),
with bit-identical losses and gradients (tested).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from tunepilot.train import cross_entropy, projections

# model -> (dtype its frozen Linear weights are in now, {parameter: fp32 original})
_KEPT: weakref.WeakKeyDictionary[nn.Module, tuple[torch.dtype, dict[nn.Parameter, torch.Tensor]]]
_KEPT = weakref.WeakKeyDictionary()


def match(model: nn.Module, dtype: torch.dtype) -> None:
    """Put the frozen Linear weights of ``model`` in ``dtype`` (fp32: the originals)."""
    current = _KEPT.get(model)
    if (current[0] if current else torch.float32) == dtype:
        return
    restore(model)
    if dtype == torch.float32:
        return
    _adapter_input_casts(model, enabled=False)
    # a weight that is also an embedding (a tied output head) is looked up outside autocast:
    # casting it would change the embeddings' precision, not just save a cast
    shared = {
        id(p) for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(False)
    }
    originals: dict[nn.Parameter, torch.Tensor] = {}

    def castable(p: nn.Parameter | None) -> bool:
        return not (p is None or p.requires_grad or p.dtype != torch.float32 or id(p) in shared)

    # the frozen weights of layers that run as one matmul (train/projections.py) go into one
    # buffer, each weight a view of its rows, so the matmul reads them without concatenating
    # them first: that copy came at every forward, and in generation at every token
    for members in projections.groups(model):
        weights = [m.weight for m in members]
        if not all(castable(w) for w in weights) or any(w in originals for w in weights):
            continue
        joined = torch.cat([w.data.to(dtype) for w in weights])
        for w, rows in zip(weights, joined.split([w.shape[0] for w in weights]), strict=True):
            originals[w] = w.data
            w.data = rows
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        for p in (module.weight, module.bias):
            if castable(p) and p not in originals:
                originals[p] = p.data
                p.data = p.data.to(dtype)
    _KEPT[model] = (dtype, originals)


@contextlib.contextmanager
def kept_in(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """``match`` for a while (an evaluation, a generation), then the weights as they were.

    Generation gains most: autocast re-casts an uncached weight for every generated token, so a
    LoRA model's greedy decoding spent over half its time copying the frozen base to bf16.
    """
    current = _KEPT.get(model)
    before = current[0] if current else torch.float32
    match(model, dtype)
    head = _frozen_tied_head(model) if dtype != torch.float32 else None
    tied = head.weight if head is not None else None
    try:
        if head is not None:
            # the output head alone reads the copy cross_entropy keeps for the loss (the same
            # values autocast makes); the embedding it is tied to stays fp32
            head.weight = nn.Parameter(cross_entropy.in_dtype(tied, dtype), requires_grad=False)
        yield
    finally:
        if head is not None:
            head.weight = tied
        match(model, before)


def _frozen_tied_head(model: nn.Module) -> nn.Linear | None:
    """The output head where it is a frozen fp32 weight tied to the input embeddings, which
    ``match`` leaves alone and autocast would cast again for every generated token (28M values
    for SmolLM2: ~6% of a LoRA model's generation time); None otherwise."""
    if not hasattr(model, "get_output_embeddings"):
        return None
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if type(head) is not nn.Linear or embeddings is None:
        return None
    weight = head.weight
    if weight is not embeddings.weight or weight.requires_grad or weight.dtype != torch.float32:
        return None
    return head


def restore(model: nn.Module) -> None:
    """The fp32 originals back in place (a no-op when nothing was cast)."""
    kept = _KEPT.pop(model, None)
    if kept is None:
        return
    for p, original in kept[1].items():
        p.data = original
    _adapter_input_casts(model, enabled=True)


def _adapter_input_casts(model: nn.Module, enabled: bool) -> None:
    """peft's switch for the input cast of its layers (``peft.helpers.disable_input_dtype_casting``
    flips the same attribute, but only for the duration of a ``with`` block)."""
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = enabled


def original(model: nn.Module, p: nn.Parameter) -> torch.Tensor:
    """The fp32 weight behind ``p`` (``p`` itself when it was not cast)."""
    kept = _KEPT.get(model)
    return kept[1].get(p, p) if kept else p
