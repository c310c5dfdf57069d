"""Causal attention of one layer on this CPU, forward + backward: what train/attention.py chooses
between for a packed sequence under bf16 autocast.

SmolLM2-135M's shape (9 query heads sharing 3 key/value heads, head dim 64), one sequence per
length: the fused kernel (``F.scaled_dot_product_attention``) in fp32 and in bf16, and
tunepilot's explicit blocked bf16 attention (``_explicit_causal``). Each figure is the best of 3
timings, each the mean of several repetitions. attention.py's thresholds (EXPLICIT_FROM,
EXPLICIT_UP_TO, BF16_FROM) were set from this comparison; run it on a new CPU kind to check
them.

    python benchmarks/attention_cpu.py [--lengths 64,128,256,384,512,768,1024]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tunepilot.hardware import cpu_flags
from tunepilot.train.attention import _explicit_causal

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def fused(dtype: torch.dtype) -> Attention:
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2)

    return attend


def explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _explicit_causal(q, k, v, None)


def milliseconds(attend: Attention, n: int, repeats: int) -> float:
    q = torch.randn(1, 9, n, 64, requires_grad=True)
    k = torch.randn(1, 3, n, 64, requires_grad=True)
    v = torch.randn(1, 3, n, 64, requires_grad=True)
    grad = torch.randn(1, n, 9, 64)
    for _ in range(2):  # warm-up: kernels chosen, buffers allocated
        attend(q, k, v).float().backward(grad)
    start = time.perf_counter()
    for _ in range(repeats):
        attend(q, k, v).float().backward(grad)
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="64,128,256,384,512,768,1024")
    args = parser.parse_args()
    torch.manual_seed(0)
    flags = cpu_flags()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"avx512_bf16: {'avx512_bf16' in flags}, amx_bf16: {'amx_bf16' in flags}"
    )
    print("forward + backward of one layer, ms (best of 3)")
    print(f"{'tokens':>6}  {'kernel fp32':>11}  {'kernel bf16':>11}  {'explicit bf16':>13}")
    paths = [fused(torch.float32), fused(torch.bfloat16), explicit]
    for n in [int(x) for x in args.lengths.split(",")]:
        repeats = max(3, 3000 // n)
        times = [min(milliseconds(p, n, repeats) for _ in range(3)) for p in paths]
        print(f"{n:>6}  {times[0]:>11.2f}  {times[1]:>11.2f}  {times[2]:>13.2f}", flush=True)


if __name__ == "__main__":
    main()
