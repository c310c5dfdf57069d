"""fp32 matmuls through oneDNN on CPUs where PyTorch's default, MKL, runs them at half speed.

PyTorch's CPU build sends fp32 matmuls to MKL and bf16 ones to oneDNN. MKL picks its kernels by
CPU vendor: on AMD EPYC Zen 5 (2 threads, AVX-512) it ran this model's fp32 shapes at 157-191
GFLOP/s, where oneDNN, which picks by instruction set, ran the same products at 293-445 (forward,
input and weight gradients at 1,300 tokens; a 2,048-square product 187 against 406; session 25).
On Intel CPUs the two are close, so which one runs is measured, not assumed
(``onednn_speedup``, once per process: the plan shows it on its hardware line).

The same function either way: an fp32 product with fp32 accumulation, whose rounding differs
from MKL's only in summation order (relative 1e-6 on these shapes). Under autocast or at any
other dtype nothing changes: bf16 products already go to oneDNN.

What is routed: every ``nn.Linear`` of the model training builds (``route``: its ``forward``
calls ``linear``, as the grouped projections of train/projections.py and peft's adapter layers
do through it), with both gradients computed by oneDNN too, and the fused loss's head products
(train/cross_entropy.py calls ``mm``). A module's own ``forward`` decides, not a mode entered
around the step: gradient checkpointing runs a layer's forward again in backward, where it
must take the path it took the first time. Attention keeps its own kernels.
"""

from __future__ import annotations

import functools
import time
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: oneDNN is used where it measured at least this much faster than MKL
MIN_SPEEDUP = 1.2

_override: bool | None = None  # use_onednn's; None: as measured


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """``x @ weight.T + bias`` by oneDNN, for 2-D ``x``."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@functools.cache
def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def onednn_speedup(size: int = 1024) -> float:
    """oneDNN's fp32 product speed over MKL's on this CPU (best of a few ``size``-square
    products each, ~0.1 s in all); 0.0 where oneDNN's product is missing or fails."""
    if not available():
        return 0.0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(size, size, generator=g)
    w = torch.randn(size, size, generator=g)
    try:
        if not torch.allclose(_onednn_linear(x, w, None), F.linear(x, w), rtol=1e-4, atol=1e-3):
            return 0.0
    except RuntimeError:
        return 0.0

    def best(fn: Any) -> float:
        fn()
        fastest = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            fn()
            fastest = min(fastest, time.perf_counter() - start)
        return fastest

    return best(lambda: F.linear(x, w)) / best(lambda: _onednn_linear(x, w, None))


def use_onednn(on: bool | None) -> None:
    """Route this process's fp32 matmuls through oneDNN (True) or not (False), whatever was
    measured; None goes back to the measurement."""
    global _override
    _override = on


def enabled() -> bool:
    """Whether fp32 products go to oneDNN in this process: where it measured at least
    ``MIN_SPEEDUP`` x MKL's speed (measured once per process, on first use)."""
    if not available():
        return False
    if _override is not None:
        return _override
    return onednn_speedup() >= MIN_SPEEDUP


def choice() -> tuple[str, str]:
    """(the fp32 matmul library, why), as the plan shows it."""
    if not available():
        return "default", "PyTorch's default (oneDNN's fp32 product is not in this build)"
    if _override is not None:
        return ("onednn" if _override else "mkl"), "set by matmul.use_onednn"
    speedup = onednn_speedup()
    if speedup >= MIN_SPEEDUP:
        return "onednn", f"oneDNN, measured {speedup:.1f}x MKL's fp32 speed here"
    return "mkl", f"MKL, oneDNN measured {speedup:.2f}x its speed here (below {MIN_SPEEDUP}x)"


class _Linear(torch.autograd.Function):
    """``F.linear`` with the product and both of its gradients computed by oneDNN."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        rows = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(rows, weight)
        ctx.shape, ctx.has_bias = x.shape, bias is not None
        out = _onednn_linear(rows, weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        rows, weight = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = _onednn_linear(grad, weight.t(), None).view(ctx.shape) if need_x else None
        grad_w = _onednn_linear(grad.t(), rows.t(), None) if need_w else None
        grad_b = grad.sum(0) if ctx.has_bias and need_b else None
        return grad_x, grad_w, grad_b


def _routable(*tensors: torch.Tensor | None) -> bool:
    """Plain fp32 CPU tensors outside autocast (a DTensor or other subclass keeps its own
    dispatch; under autocast the product runs in the autocast dtype, already oneDNN's)."""
    if torch.is_autocast_enabled("cpu"):
        return False
    return all(
        t is None
        or (
            type(t) in (torch.Tensor, torch.nn.Parameter)
            and t.dtype == torch.float32
            and t.device.type == "cpu"
        )
        for t in tensors
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear``, by oneDNN where this process routes fp32 products there."""
    shaped = weight.dim() == 2 and x.dim() >= 1 and x.numel() > 0
    if shaped and _routable(x, weight, bias) and enabled():
        return _Linear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


def route(model: nn.Module) -> int:
    """Every ``nn.Linear`` in ``model`` whose ``forward`` is its class's computes through
    ``linear``; returns how many. Only ``forward`` changes (an instance attribute), so
    parameters, state dicts and exports are untouched."""
    routed = 0
    for module in model.modules():
        if type(module) is nn.Linear and "forward" not in vars(module):
            module.forward = types.MethodType(_forward, module)
            routed += 1
    return routed


def unroute(modules: list[nn.Module]) -> None:
    """The linear layers in ``modules`` (and below) compute as their class does again: what
    torch.compile compiles is traced from plain PyTorch."""
    for root in modules:
        for module in root.modules():
            forward = vars(module).get("forward")
            if getattr(forward, "__func__", None) is _forward:
                del module.forward


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D tensors, by oneDNN where this run routes fp32 products there (the
    fused loss's head products, which run without autograd)."""
    if _routable(a, b) and a.numel() and b.numel() and enabled():
        return _onednn_linear(a, b.t(), None)
    return a @ b
