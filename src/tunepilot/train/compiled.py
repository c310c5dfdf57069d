"""The decoder layers' feed-forward and norm modules compiled while the loop runs.

``train.compile`` (decided in plan/compilation.py) turns it on. Each module is compiled in place
(``nn.Module.compile``: names and state dicts stay as they were, so checkpoints, rollbacks and
exports are untouched) with dynamic shapes, because packed rows change length every step.
Attention is left eager: packed rows take their own per-sequence path there. Should a graph fail
to compile, dynamo runs that code eagerly instead of failing the run (``suppress_errors``), and
a compile that cannot work at all (no C++ compiler) is caught by a trial call before training.
Afterwards the modules are eager again: evaluation and generation have other shapes and no
gradients, and compiling them would cost more than it saves.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from tunepilot import model as models
from tunepilot.train import matmul, projections
from tunepilot.train.step import autocast


def hot_modules(model: nn.Module) -> list[nn.Module]:
    """Every decoder layer's children except its attention (feed-forward, norms)."""
    base = models.base_model(model)
    layer_types = set(getattr(base, "_no_split_modules", None) or ())
    return [
        child
        for layer in base.modules()
        if type(layer).__name__ in layer_types
        for child in layer.children()
        if "attention" not in type(child).__name__.lower()  # not post_attention_layernorm
    ]


@contextmanager
def compiled(model: nn.Module, on: bool, precision: str, device: str) -> Iterator[str]:
    """While inside, the hot modules run compiled (when ``on``); yields what was done."""
    modules = hot_modules(model) if on else []
    if not modules:
        yield "eager" + (" (no decoder layers found to compile)" if on else "")
        return
    suppress = torch._dynamo.config.suppress_errors
    # a shared matmul keeps state between its layers' calls (train/projections.py): what is
    # compiled computes each projection alone, and the compiler fuses around the matmuls
    projections.unshare(modules)
    matmul.unroute(modules)
    for module in modules:
        module.compile(dynamic=True)
    try:
        _trial(modules[0], precision, device)
    except Exception as exc:  # whatever the compiler's failure, training goes on eagerly
        _eager(modules)
        yield f"eager (torch.compile failed: {str(exc).strip().splitlines()[0][:120]})"
        return
    torch._dynamo.config.suppress_errors = True
    try:
        yield f"torch.compile on {len(modules)} feed-forward and norm modules"
    finally:
        torch._dynamo.config.suppress_errors = suppress
        _eager(modules)


def _trial(module: nn.Module, precision: str, device: str) -> None:
    """One small forward and backward through a compiled module: compiles it, or raises."""
    width = next(p for p in module.parameters()).shape[-1]
    x = torch.randn(1, 8, width, device=device, requires_grad=True)
    with autocast(precision, device):
        out = module(x)
    # the gradient of x only: nothing may reach the parameters' .grad before the first step
    torch.autograd.grad(out.float().sum(), x)


def _eager(modules: list[nn.Module]) -> None:
    for module in modules:
        module._compiled_call_impl = None  # what nn.Module.compile set
