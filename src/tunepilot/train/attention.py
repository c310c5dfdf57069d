"""Attention for packed rows: several sequences back to back, each attending only to itself.

A packed micro-batch is one row with no padding; ``cu_seq_lens`` marks where each sequence
starts. transformers' own SDPA path can isolate packed sequences too (it builds a block-diagonal
mask from position ids), but then every layer pays for a [T, T] score matrix of which only the
diagonal blocks are used; on CPU that was measured slower than attending per sequence. So:

- CUDA with flash-attn installed: transformers' ``flash_attention_2`` varlen kernel, which takes
  the same ``cu_seq_lens_*`` arguments;
- CUDA without it: ``packed_sdpa`` below hands the row to PyTorch's own varlen flash kernel
  (``torch.nn.attention.varlen``, PyTorch 2.10+, bf16/fp16 only): one launch per layer for all
  sequences, where one SDPA call per sequence is a launch per sequence;
- otherwise (CPU, fp32, older PyTorch or GPU): one causal SDPA call per sequence (exact, no
  [T, T] mask).

Without ``cu_seq_lens_q`` (evaluation, generation, padded batches) ``packed_sdpa`` is plain
SDPA, so a model switched to it behaves as before everywhere else, with one exception: on a
CPU, a generated token attending to its cache takes two fp32 matmuls instead of the fused
kernel, which is slower at one query per row (``_explicit_decode``).
"""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from tunepilot import model as models

PACKED_SDPA = "tunepilot_packed_sdpa"

try:  # PyTorch 2.10+; its arguments changed between releases, so read them off the signature
    from torch.nn.attention.varlen import varlen_attn

    _VARLEN_ARGS = frozenset(inspect.signature(varlen_attn).parameters)
except ImportError:  # older PyTorch
    varlen_attn = None
    _VARLEN_ARGS = frozenset()
_varlen_failed: list[str] = []  # the first failure, so a broken kernel is tried (and told) once


def packed_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None and _decodes_explicitly(module, query, key, attention_mask, dropout):
        return _explicit_decode(query, key, value, attention_mask, scaling), None
    if bounds is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    # query [1, heads, T, dim]; key/value [1, kv_heads, T, dim] (grouped-query attention:
    # enable_gqa shares each key/value head without copying it per query head)
    if query.device.type != "cpu":
        dropout = dropout if module.training else 0.0
        out = _varlen(query, key, value, bounds, scaling, dropout, kwargs.get("max_length_q"))
        if out is None:
            out = _per_sequence(query, key, value, bounds, scaling, dropout, module.training)
        return out, None
    # Under bf16 autocast SDPA would run every sequence in bf16. On CPU the kernel runs short
    # sequences faster in fp32, long ones faster in bf16 where the CPU has AMX (benchmark CPU,
    # fwd + bwd of one layer's 9 heads: 256 tokens 2.8 ms fp32 vs 3.1 ms bf16; 320 even; 512
    # 10.0 vs 8.6 ms; 1,024 28.5 vs 18.3 ms), so each sequence takes the faster one. Autocast
    # must be off in here: it lists SDPA as a bf16 op and would cast the fp32 inputs down
    autocast = torch.is_autocast_enabled("cpu")
    out_dtype = torch.get_autocast_dtype("cpu") if autocast else query.dtype
    bf16 = out_dtype == torch.bfloat16
    long_dtype = torch.bfloat16 if bf16 and _amx() else torch.float32
    # without AMX (AVX-512 BF16 only) the kernel's bf16 path is slower than fp32 up to ~600
    # tokens, while bf16 matmuls still run ~1.9x fp32: there the mid-length sequences attend
    # through explicit bf16 matmuls instead (see _explicit_causal)
    explicit = bf16 and dropout == 0.0 and _explicit_pays()
    with torch.autocast("cpu", enabled=False):
        out = _per_sequence(
            query,
            key,
            value,
            bounds,
            scaling,
            dropout,
            module.training,
            dtype_for=lambda n: long_dtype if n >= BF16_FROM else torch.float32,
            out_dtype=out_dtype,
            explicit_for=(lambda n: EXPLICIT_FROM <= n <= EXPLICIT_UP_TO) if explicit else None,
        )
    return out, None


# sequences this long or longer attend in bf16 on an AMX CPU under bf16 autocast (crossover
# measured at ~320 tokens; bf16 12% faster at 384)
BF16_FROM = 384
# on a CPU with AVX-512 BF16 but no AMX, under bf16 autocast, sequences of this many tokens attend
# through explicit bf16 matmuls. Forward + backward of one layer (9 heads, 3 key/value heads, dim
# 64; AMD EPYC, 2 threads), explicit bf16 vs the fused kernel in fp32 (its faster dtype at these
# lengths): 64 tokens 0.63 vs 0.46 ms, 128 0.92 vs 1.28 (timed without the glibc heap-reuse
# settings the loop used until session 16, which inflate both); with them, 256 2.1 vs 4.7, 512 6.1
# vs 17.8, 1,024 20.2 vs 51.6 (blocked, see QUERY_BLOCK). The score tables are held for backward,
# which is what caps the length (1,024 tokens in 4 query blocks: 11.5 MB per layer); the fused
# kernel holds none. Full bf16 fine-tune, one packed row of 8 x 1,024 tokens: 26.0 s and 13.3 GB
# peak explicit, 32.3 s and 12.3 GB with the kernel in fp32. heaviest_length() tells the batch
# probe which rows are the worst case.
EXPLICIT_FROM = 128
EXPLICIT_UP_TO = 1024
# query positions per block of explicit attention (fwd + bwd of one layer, same CPU, blocks of
# ~256 against one block: 512 tokens 6.1 vs 7.2 ms, 768 12.7 vs 17.4, 1,024 20.2 vs 29.7; 64-
# or 128-position blocks were no faster)
QUERY_BLOCK = 256


def heaviest_length(max_length: int, precision: str, device: str) -> int:
    """The length, among sequences of at most ``max_length`` tokens, whose attention holds the
    most memory per token while training here: for the batch probe, whose packed rows must
    cost at least what any real row of as many tokens costs.

    The fused kernel holds next to nothing per token at any length; explicit attention holds
    its score tables, more per token the longer the sequence. So where explicit attention may
    run and ``max_length`` is longer than it goes, rows of EXPLICIT_UP_TO-token sequences are
    the heaviest (full bf16 fine-tune, 8 x 1,024 tokens: 13.3 GB peak against 12.3 GB with the
    kernel); otherwise ``max_length`` itself.
    """
    explicit = device == "cpu" and precision == "bf16" and _explicit_pays()
    return EXPLICIT_UP_TO if explicit and max_length > EXPLICIT_UP_TO else max_length


@functools.cache
def _amx() -> bool:
    from tunepilot.hardware import cpu_flags

    return "amx_bf16" in cpu_flags()


@functools.cache
def _explicit_pays() -> bool:
    """Measured only on an AVX-512 BF16 CPU without AMX; elsewhere the fused kernel stays."""
    from tunepilot.hardware import cpu_flags

    return not _amx() and "avx512_bf16" in cpu_flags()


def varlen_available(device: str) -> bool:
    """PyTorch ships a varlen flash kernel that runs on this device (CUDA, PyTorch 2.10+,
    Ampere or newer: on a T4 or V100 the kernel refuses, so it is not tried there at all)."""
    return varlen_attn is not None and device == "cuda" and _ampere_or_newer()


@functools.cache
def _ampere_or_newer() -> bool:
    return torch.cuda.get_device_capability() >= (8, 0)


def _varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: torch.Tensor,
    scaling: float | None,
    dropout: float,
    longest: int | None,
) -> torch.Tensor | None:
    """All sequences of the row in one call of PyTorch's varlen flash kernel; [1, T, heads, dim]
    like transformers' SDPA, or None where that kernel does not apply (then the caller attends
    per sequence): no kernel, fp32 compute, dropout (the kernel has none) or an earlier failure."""
    if not varlen_available(query.device.type) or dropout > 0 or _varlen_failed:
        return None
    autocast = torch.is_autocast_enabled(query.device.type)
    dtype = torch.get_autocast_dtype(query.device.type) if autocast else query.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    # [1, heads, T, dim] -> [T, heads, dim]; under autocast RoPE hands q/k over in fp32, and
    # SDPA would have cast them to the autocast dtype too
    q, k, v = (t[0].transpose(0, 1).to(dtype).contiguous() for t in (query, key, value))
    options: dict[str, Any] = {}
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and "enable_gqa" in _VARLEN_ARGS:
        options["enable_gqa"] = True
    elif groups > 1:  # an older kernel: share each key/value head by copying it
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if "is_causal" in _VARLEN_ARGS:
        options["is_causal"] = True
    elif "window_size" in _VARLEN_ARGS:
        options["window_size"] = (-1, 0)  # later releases spell causal as a window
    else:
        return None
    if "scale" in _VARLEN_ARGS:
        options["scale"] = scaling
    elif scaling is not None and abs(scaling * q.shape[-1] ** 0.5 - 1) > 1e-6:
        return None  # the first release has no scale argument: only the default 1/sqrt(dim)
    cu = bounds.to(torch.int32)
    if longest is None:
        longest = int(bounds.diff().max())
    try:
        out = varlen_attn(q, k, v, cu, cu, longest, longest, **options)
    except (RuntimeError, ValueError, TypeError) as exc:
        _varlen_failed.append(str(exc))
        warnings.warn(
            f"PyTorch's varlen attention failed ({str(exc).splitlines()[0][:200]}); "
            "attending one sequence at a time instead",
            stacklevel=2,
        )
        return None
    return out.unsqueeze(0)


_lengths: tuple[weakref.ref, int, list[int]] | None = None


def _sequence_lengths(bounds: torch.Tensor) -> list[int]:
    """The packed sequences' lengths, read once per row rather than once per layer: on a GPU
    each read waits for the device (30 syncs per forward for SmolLM2's 30 layers). Every layer
    of one forward receives the same ``cu_seq_lens`` tensor, which is what the cache keys on."""
    global _lengths
    if _lengths is None or _lengths[0]() is not bounds or _lengths[1] != bounds._version:
        _lengths = (weakref.ref(bounds), bounds._version, bounds.diff().tolist())
    return _lengths[2]


def _per_sequence(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: torch.Tensor,
    scaling: float | None,
    dropout: float,
    training: bool,
    dtype_for: Callable[[int], torch.dtype] | None = None,
    out_dtype: torch.dtype | None = None,
    explicit_for: Callable[[int], bool] | None = None,
) -> torch.Tensor:
    """One causal SDPA call per sequence, each in ``dtype_for(its length)`` (else as given), or
    explicit bf16 attention where ``explicit_for(its length)``; returns [1, T, heads, dim] like
    transformers' SDPA, in ``out_dtype`` (else as computed)."""
    # split, not slicing: the backward of n slices zero-fills n full-size gradients (measured
    # as a fifth of step time on CPU); the backward of one split is one concatenation
    lengths = _sequence_lengths(bounds)
    parts = []
    for q, k, v in zip(
        query.split(lengths, dim=2),
        key.split(lengths, dim=2),
        value.split(lengths, dim=2),
        strict=True,
    ):
        if explicit_for is not None and explicit_for(q.shape[2]):
            parts.append(_explicit_causal(q, k, v, scaling).to(out_dtype or torch.bfloat16))
            continue
        if dtype_for is not None:
            dtype = dtype_for(q.shape[2])
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=dropout if training else 0.0,
            is_causal=True,
            scale=scaling,
            enable_gqa=True,
        )
        parts.append(out.transpose(1, 2).to(out_dtype or out.dtype))
    # concatenating the transposed parts writes [1, T, heads, dim] in one pass
    return torch.cat(parts, dim=1)


def _explicit_causal(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """Causal attention of one sequence as bf16 matmuls and a softmax, like transformers'
    eager attention under bf16 autocast: the scores are rounded to bf16 before the softmax
    (the fused kernel keeps them in fp32; its bf16 path rounds only the probabilities).

    [1, heads, n, dim] query, [1, kv_heads, n, dim] key and value -> [1, n, heads, dim] bf16.
    Query rows are ordered (key/value head, position, head in its group), so each key/value
    head takes one matmul against all of its query heads without copying the key or value, and
    every row of a position shares a mask row: the mask for n tokens is the top-left corner of
    one cached table.

    The queries go in blocks of at most QUERY_BLOCK positions, each against the keys up to its
    own last position only: the scores above the diagonal that the mask would discard are
    mostly never computed (4 blocks at 1,024 tokens compute 62.5% of the square) nor held for
    backward. Every row's softmax still sees all of its keys, so blocking changes no value.
    """
    _, heads, n, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    bf16 = torch.bfloat16
    q = query[0].view(kv_heads, group, n, dim).transpose(1, 2)
    # one pass casts and lays out; reshape, not view: a query already in bf16 (a model whose
    # rotary embedding keeps bf16) comes back from .to() as the same strided view
    q = q.to(bf16, memory_format=torch.contiguous_format).reshape(kv_heads, n * group, dim)
    k, v = key[0].to(bf16), value[0].to(bf16)
    scale = dim**-0.5 if scaling is None else scaling
    table = _causal_table(group, query.device, max(n, EXPLICIT_UP_TO))
    blocks = -(-n // QUERY_BLOCK)
    ends = [n * (i + 1) // blocks for i in range(blocks)]
    starts = [0, *ends[:-1]]
    # split, not slicing, for the queries: one concatenation in backward, not a zero-filled
    # gradient per block (the keys' prefixes overlap, so those are sliced: 3 x n x 64, small)
    pieces = q.split(
        [(end - start) * group for start, end in zip(starts, ends, strict=True)], dim=1
    )
    parts = []
    for piece, start, end in zip(pieces, starts, ends, strict=True):
        mask = table[start * group : end * group, :end]
        scores = torch.baddbmm(mask, piece, k[:, :end].transpose(1, 2), alpha=scale)
        parts.append(torch.bmm(torch.softmax(scores, dim=-1), v[:, :end]))
    out = parts[0] if blocks == 1 else torch.cat(parts, dim=1)  # [kv, n * group, dim]
    return out.view(kv_heads, n, group, dim).transpose(0, 1).reshape(1, n, heads, dim)


def _decodes_explicitly(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    dropout: float,
) -> bool:
    """Whether this call is one generated token per row attending to its cache, on a CPU: there
    the fused kernel costs more than the arithmetic. 64 rows, 9 heads over 3 key/value heads,
    dim 64, 40-160 cached tokens (AMD EPYC Zen 5, 2 threads): 1.5-5.2 ms per call in bf16 (what
    autocast runs it in) and 0.38-0.92 ms in fp32, against 0.23-0.74 ms as two fp32 matmuls and
    a softmax. Generating 32 tokens for 64 prompts with the bundled model under bf16 autocast,
    where the kernel took 17% of the time: 5.50-5.57 s against 6.13-6.51 s."""
    return (
        query.device.type == "cpu"
        and query.shape[2] == 1
        and (dropout == 0.0 or not module.training)
        and (mask is None or (mask.dim() == 4 and mask.shape[-1] == key.shape[2]))
    )


def _explicit_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """[b, heads, 1, dim] query, [b, kv_heads, n, dim] cache, ``mask`` [b or 1, 1, 1, n] (True
    or 0 where a key may be seen) -> [b, 1, heads, dim], as transformers' SDPA returns it, in
    the dtype it would (autocast's). Each key/value head takes its group of query heads as rows
    of one matmul, without copying the cache per query head. Computed in fp32 throughout: the
    arithmetic is small here, and the result is closer to fp32 generation than the kernel's
    bf16 path (bundled model, 64 prompts x 32 greedy tokens under bf16 autocast: 19 rows
    differed somewhere from a fp32 generation this way, 23 with the kernel)."""
    b, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    device = query.device.type
    out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    scale = dim**-0.5 if scaling is None else scaling
    with torch.autocast(device, enabled=False):
        q = query.float().reshape(b, kv_heads, heads // kv_heads, dim)
        scores = torch.matmul(q, key.float().transpose(-1, -2)) * scale  # [b, kv, group, n]
        if mask is not None:
            last = mask[:, :, -1:, :]  # the new token's row, broadcast over the heads
            if last.dtype == torch.bool:
                scores = scores.masked_fill(~last, float("-inf"))
            else:
                scores = scores + last
        out = torch.matmul(torch.softmax(scores, dim=-1), value.float())
    return out.to(out_dtype or query.dtype).reshape(b, 1, heads, dim)


@functools.cache
def _causal_table(group: int, device: torch.device, size: int) -> torch.Tensor:
    """[size * group, size] additive bf16 mask: row r is position r // group,
    and sees the keys at or before it (6 MB at 1,024 tokens for groups of 3)."""
    position = torch.arange(size * group, device=device) // group
    future = torch.arange(size, device=device)[None, :] > position[:, None]
    table = torch.zeros(future.shape, dtype=torch.bfloat16, device=device)
    return table.masked_fill_(future, float("-inf"))


AttentionInterface.register(PACKED_SDPA, packed_sdpa)
# padded batches (eval, generation) still need the usual SDPA masks
ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)


# Passed as the attention mask of a packed row: transformers returns a 4D mask as it is, so it
# neither detects the packing from the position ids (a host-device sync) nor builds the
# block-diagonal [T, T] mask that packed_sdpa never reads (T^2 bytes: 268 MB and ~0.5 s on
# this CPU for a 16k-token row, 4 GB for 64k tokens on a GPU).
NO_MASK = torch.empty(1, 1, 0, 0, dtype=torch.bool)


def skips_packed_mask(model: nn.Module) -> bool:
    """Whether ``model`` (under a peft wrapper or not; the loss never sees DDP's wrapper, see
    distributed.Replica) attends through ``packed_sdpa``, which reads ``cu_seq_lens`` and never
    the mask of a packed row."""
    config = getattr(models.base_model(model), "config", None)
    return getattr(config, "_attn_implementation", None) == PACKED_SDPA


def use_packed_attention(model: nn.Module, flash: bool) -> str:
    """Switch the model (or the base model under a peft wrapper) to packed attention."""
    base = models.base_model(model)
    name = "flash_attention_2" if flash else PACKED_SDPA
    base.set_attn_implementation(name)
    return name
