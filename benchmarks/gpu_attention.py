"""Packed attention on a CUDA GPU: PyTorch's varlen kernel vs one SDPA call per sequence.

One packed row of long-tailed sequences (SmolLM2-135M's attention shape: 9 query heads, 3
key/value heads, dim 64), forward + backward in bf16, for rows of 8, 32 and 128 sequences.
Also the padded batch the Trainer would run (one SDPA call over [n, longest], padding
included) for scale. Median of 20 timed repeats after warm-up, CUDA events.

    python benchmarks/gpu_attention.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from tunepilot.train import attention

HEADS, KV_HEADS, DIM = 9, 3, 64
# a long tail like benchmarks/longtail.py's: mostly short, a few near 1,000 tokens
TAIL = [23, 31, 45, 52, 67, 88, 96, 120, 143, 180, 230, 310, 420, 610, 830, 990]


def timed(fn) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def row(n: int) -> tuple[int, float, float, float]:
    """(tokens, per-sequence ms, varlen ms, padded ms) for a packed row of n sequences."""
    lengths = [TAIL[(i * 7) % len(TAIL)] for i in range(n)]
    total, longest = sum(lengths), max(lengths)
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")

    def tensors(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    q, k, v = (
        tensors(1, HEADS, total, DIM),
        tensors(1, KV_HEADS, total, DIM),
        tensors(1, KV_HEADS, total, DIM),
    )
    grad = torch.randn(1, total, HEADS, DIM, device="cuda", dtype=torch.bfloat16)

    def per_sequence() -> None:
        out = attention._per_sequence(q, k, v, bounds, DIM**-0.5, 0.0, True)
        torch.autograd.grad(out, (q, k, v), grad)

    def varlen() -> None:
        out = attention._varlen(q, k, v, bounds, DIM**-0.5, 0.0, longest)
        torch.autograd.grad(out, (q, k, v), grad)

    pq, pk, pv = (
        tensors(n, HEADS, longest, DIM),
        tensors(n, KV_HEADS, longest, DIM),
        tensors(n, KV_HEADS, longest, DIM),
    )
    real = (
        torch.arange(longest, device="cuda")[None, :]
        < torch.tensor(lengths, device="cuda")[:, None]
    )
    causal = torch.ones(longest, longest, device="cuda", dtype=torch.bool).tril()
    mask = real[:, None, None, :] & causal

    def padded() -> None:
        out = F.scaled_dot_product_attention(pq, pk, pv, attn_mask=mask, enable_gqa=True)
        torch.autograd.grad(out, (pq, pk, pv), torch.ones_like(out))

    fast = timed(varlen) if attention.varlen_available("cuda") else float("nan")
    return total, timed(per_sequence), fast, timed(padded)


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    print(
        f"{torch.cuda.get_device_name()}; torch {torch.__version__}; varlen kernel: "
        f"{attention.varlen_available('cuda')} {sorted(attention._VARLEN_ARGS)}"
    )
    print("| sequences | tokens | per-sequence SDPA ms | varlen ms | padded batch ms | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in (8, 32, 128):
        total, slow, fast, pad = row(n)
        print(f"| {n} | {total} | {slow:.2f} | {fast:.2f} | {pad:.2f} | {slow / fast:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
