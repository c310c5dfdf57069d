"""Packed rows must compute exactly what padded batches compute, with no padding.

A packed row holds several examples back to back. If the attention let one example see
another, or a label crossed a boundary, training would silently learn from the wrong context;
these tests compare each example's loss packed with its loss alone.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from tests.conftest import tiny_config, tokenized_chat
from tunepilot.data.batching import IGNORE, collate, micro_batches, pack, token_bins
from tunepilot.model import supports_packing
from tunepilot.train import attention
from tunepilot.train.step import accumulate, loss_sum, model_inputs


def gqa_model(vocab: int) -> LlamaForCausalLM:
    """Grouped-query attention (4 heads, 2 KV heads), as in SmolLM2."""
    torch.manual_seed(0)
    config = tiny_config(vocab)
    config.hidden_size, config.num_attention_heads, config.num_key_value_heads = 32, 4, 2
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model


@pytest.fixture
def examples(tokenizer):
    out = tokenized_chat(tokenizer, 6, seed=5)
    assert len({len(e.input_ids) for e in out}) > 3  # varied lengths, or nothing is tested
    return out


def per_example_losses(model, batch) -> list[float]:
    """Summed token loss of each example inside a packed row."""
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits[0, :-1]
    targets = batch.labels[0, 1:]
    keep = targets != IGNORE
    token_loss = torch.zeros_like(targets, dtype=torch.float32)
    token_loss[keep] = F.cross_entropy(logits[keep], targets[keep], reduction="none")
    cuts = batch.cu_seq_lens.tolist()
    # the target at position t sits at index t - 1 after the shift
    return [float(token_loss[max(s - 1, 0) : e - 1].sum()) for s, e in itertools.pairwise(cuts)]


def alone(model, examples) -> list[float]:
    with torch.no_grad():
        return [float(loss_sum(model, collate([e], 512, 0), "fp32", "cpu")) for e in examples]


@pytest.mark.parametrize("impl", [attention.PACKED_SDPA, "sdpa"])
def test_each_packed_example_has_its_own_loss(tokenizer, examples, impl):
    model = gqa_model(len(tokenizer)).eval()
    model.set_attn_implementation(impl)
    reference = alone(model, examples)
    packed = per_example_losses(model, pack(examples, 512))
    for got, want in zip(packed, reference, strict=True):
        assert abs(got - want) <= 1e-4 * max(1.0, abs(want))


def test_the_kv_cache_would_let_packed_examples_see_each_other(tokenizer, examples):
    """Why model_inputs always passes use_cache=False: with a cache, transformers' SDPA path
    ignores the per-example positions when building the mask. If this ever stops failing,
    the guard is no longer needed, but the equality above must still hold."""
    model = gqa_model(len(tokenizer)).eval()
    model.set_attn_implementation("sdpa")
    batch = pack(examples, 512)
    inputs = model_inputs(batch) | {"use_cache": True}
    for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
        inputs.pop(key)
    with torch.no_grad():
        leaky = model(**inputs).logits
        clean = model(**model_inputs(batch)).logits
    second = slice(int(batch.cu_seq_lens[1]), int(batch.cu_seq_lens[2]))
    assert (leaky[0, second] - clean[0, second]).abs().max() > 1e-3


def test_no_label_crosses_a_boundary(examples):
    batch = pack(examples, 512)
    starts = batch.cu_seq_lens[:-1].long()
    assert (batch.labels[0, starts] == IGNORE).all()
    assert batch.attention_mask is None and batch.padded_tokens == batch.real_tokens
    assert batch.position_ids[0, starts].eq(0).all()
    assert batch.supervised_tokens == sum(
        int((collate([e], 512, 0).labels != IGNORE).sum()) for e in examples
    )


def test_truncation_applies_per_example(examples):
    batch = pack(examples, 16)
    assert batch.real_tokens == 16 * len(examples)
    assert batch.position_ids.max() == 15


def test_packed_step_gradients_equal_padded(tokenizer, examples):
    def grads(packing: bool):
        model = gqa_model(len(tokenizer))
        model.set_attn_implementation(attention.PACKED_SDPA)
        batches = micro_batches(examples, 2, 512, 0, packing)
        loss, tokens = accumulate(model, batches, "fp32", "cpu", None)
        return loss, tokens, [p.grad.clone() for p in model.parameters()], batches

    loss_p, tokens_p, g_p, packed = grads(True)
    loss_d, tokens_d, g_d, padded = grads(False)
    assert all(b.packed for b in packed) and not any(b.packed for b in padded)
    assert tokens_p == tokens_d
    assert abs(loss_p - loss_d) < 1e-5
    for a, b in zip(g_p, g_d, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_packed_rows_under_packed_sdpa_build_no_mask(tokenizer, examples, monkeypatch):
    """packed_sdpa reads cu_seq_lens, so transformers must not build the [T, T] block-diagonal
    mask of a packed row (quadratic in the row's tokens) nor sync to detect the packing; the
    test above shows the losses and gradients stay those of padded batches."""
    from transformers import masking_utils

    built = []
    detect = masking_utils.find_packed_sequence_indices

    def spy(*args, **kwargs):
        built.append(1)
        return detect(*args, **kwargs)

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", spy)
    model = gqa_model(len(tokenizer))
    attention.use_packed_attention(model, False)
    batch = pack(examples, 512)
    loss_sum(model, batch, "fp32", "cpu")
    assert built == []
    model.set_attn_implementation("sdpa")  # transformers' own path still builds its mask
    assert not attention.skips_packed_mask(model)
    loss_sum(model, batch, "fp32", "cpu")
    assert built == [1]


def test_token_bins_place_every_example_once_within_budget():
    lengths = [700, 30, 250, 90, 90, 400, 1200, 5, 60]
    bins = token_bins(lengths, 1024)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    for b in bins:
        assert sum(lengths[i] for i in b) <= 1024 or len(b) == 1  # an oversize example alone
    assert len(bins) == 3  # 1200 | 700+250+60+5 | 400+90+90+30 (first-fit decreasing)


def test_padded_micro_batches_group_similar_lengths(examples):
    batches = micro_batches(examples, 2, 512, 0, packing=False)
    shuffled = [collate(examples[i : i + 2], 512, 0) for i in range(0, len(examples), 2)]
    assert sum(b.padded_tokens for b in batches) <= sum(b.padded_tokens for b in shuffled)


def test_llama_supports_packing_and_an_unknown_config_does_not():
    assert supports_packing(tiny_config(100))
    assert not supports_packing(object())


needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (never required by CI)"
)


@needs_cuda
def test_packed_rows_on_gpu_match_examples_alone(tokenizer, examples, monkeypatch):
    """The GPU path: flash-attention varlen when flash-attn is installed, else PyTorch's varlen
    kernel where it exists, else per-example SDPA; bf16 autocast, so the tolerance is bf16's."""
    from tunepilot.hardware import detect

    hw = detect()
    calls = []
    if attention.varlen_attn is not None:
        kernel = attention.varlen_attn
        monkeypatch.setattr(
            attention, "varlen_attn", lambda *a, **k: calls.append(1) or kernel(*a, **k)
        )
    model = gqa_model(len(tokenizer)).cuda().eval()
    reference = [
        float(loss_sum(model, collate([e], 512, 0).to("cuda"), "bf16", "cuda")) for e in examples
    ]
    name = attention.use_packed_attention(model, hw.flash_attention)
    assert name == ("flash_attention_2" if hw.flash_attention else attention.PACKED_SDPA)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        packed = per_example_losses(model, pack(examples, 512).to("cuda"))
    for got, want in zip(packed, reference, strict=True):
        assert abs(got - want) <= 2e-2 * max(1.0, abs(want))
    if hw.varlen_attention and not hw.flash_attention:
        assert calls and not attention._varlen_failed  # one kernel call per layer, no fallback


@needs_cuda
def test_varlen_kernel_gradients_match_per_sequence_attention():
    """PyTorch's varlen kernel (when this PyTorch has it) against one SDPA call per sequence:
    outputs and the gradients of query, key and value, in bf16."""
    if not attention.varlen_available("cuda"):
        pytest.skip("this PyTorch has no varlen attention kernel")
    torch.manual_seed(0)
    bounds = torch.tensor([0, 37, 38, 300, 517], device="cuda")
    shapes = ((1, 8, 517, 64), (1, 2, 517, 64), (1, 2, 517, 64))
    inputs = [
        torch.randn(s, device="cuda", dtype=torch.bfloat16, requires_grad=True) for s in shapes
    ]
    grad = torch.randn(1, 517, 8, 64, device="cuda", dtype=torch.bfloat16)
    fast = attention._varlen(*inputs, bounds, 64**-0.5, 0.0, None)
    assert fast is not None and not attention._varlen_failed
    fast_grads = torch.autograd.grad(fast, inputs, grad)
    slow = attention._per_sequence(*inputs, bounds, 64**-0.5, 0.0, True)
    slow_grads = torch.autograd.grad(slow, inputs, grad)
    for got, want in zip((fast, *fast_grads), (slow, *slow_grads), strict=True):
        assert float((got.float() - want.float()).norm() / want.float().norm()) < 1e-2


def test_packed_sdpa_on_bf16_inputs_returns_bf16_and_matches_per_sequence_attention():
    # CPU computes packed attention in fp32 (faster there than bf16), then hands bf16 back
    torch.manual_seed(0)
    lengths = [5, 9, 3]
    q = torch.randn(1, 4, sum(lengths), 8).bfloat16()
    k, v = torch.randn(2, 1, 2, sum(lengths), 8).bfloat16()
    module = torch.nn.Module()
    bounds = torch.tensor([0, 5, 14, 17])
    out, _ = attention.packed_sdpa(module, q, k, v, None, cu_seq_lens_q=bounds)
    assert out.dtype == torch.bfloat16 and out.shape == (1, sum(lengths), 4, 8)
    for s, e in itertools.pairwise(bounds.tolist()):
        expected = F.scaled_dot_product_attention(
            q[:, :, s:e].float(),
            k[:, :, s:e].float().repeat_interleave(2, dim=1),
            v[:, :, s:e].float().repeat_interleave(2, dim=1),
            is_causal=True,
        )
        torch.testing.assert_close(
            out[:, s:e].float(), expected.transpose(1, 2), atol=1e-2, rtol=1e-2
        )


def test_per_sequence_attention_as_gpus_call_it_keeps_dtypes_and_layout():
    """The GPU fallback calls it without dtype choices: the inputs' dtype, [1, T, heads, dim]."""
    torch.manual_seed(0)
    bounds = torch.tensor([0, 4, 11])
    q, k, v = torch.randn(1, 4, 11, 8), torch.randn(1, 2, 11, 8), torch.randn(1, 2, 11, 8)
    out = attention._per_sequence(q, k, v, bounds, None, 0.0, False)
    assert out.shape == (1, 11, 4, 8) and out.dtype == torch.float32 and out.is_contiguous()
    for s, e in itertools.pairwise(bounds.tolist()):
        expected = F.scaled_dot_product_attention(
            q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, enable_gqa=True
        )
        torch.testing.assert_close(out[:, s:e], expected.transpose(1, 2))


@pytest.mark.parametrize("amx", [True, False])
def test_packed_sdpa_under_cpu_autocast_picks_each_sequences_faster_dtype(monkeypatch, amx):
    # inside the model, RoPE hands query and key over in fp32 and value in bf16; autocast would
    # cast all three down to bf16 for SDPA, slower on CPU than fp32 for short sequences; long
    # ones run faster in bf16 where the CPU has AMX (BF16_FROM, lowered here to 6 tokens)
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.shape[2], q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(attention, "BF16_FROM", 6)
    monkeypatch.setattr(attention, "_amx", lambda: amx)
    monkeypatch.setattr(attention, "_explicit_pays", lambda: False)
    torch.manual_seed(0)
    q = torch.randn(1, 4, 12, 8, requires_grad=True)
    k = torch.randn(1, 2, 12, 8, requires_grad=True)
    v = torch.randn(1, 2, 12, 8).bfloat16().requires_grad_(True)
    bounds = torch.tensor([0, 7, 12])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attention.packed_sdpa(torch.nn.Module(), q, k, v, None, cu_seq_lens_q=bounds)
    long = torch.bfloat16 if amx else torch.float32
    assert seen == [(7, long, long, long), (5, *(torch.float32,) * 3)]
    assert out.dtype == torch.bfloat16 and out.shape == (1, 12, 4, 8)  # as autocast's SDPA
    for s, e in itertools.pairwise(bounds.tolist()):
        expected = sdpa(
            q[:, :, s:e].detach(),
            k[:, :, s:e].detach(),
            v[:, :, s:e].detach().float(),
            is_causal=True,
            enable_gqa=True,
        )
        torch.testing.assert_close(
            out[:, s:e].float(), expected.transpose(1, 2), atol=2e-2, rtol=2e-2
        )
    out.float().sum().backward()  # gradients reach every input, in its own dtype
    assert (q.grad.dtype, k.grad.dtype, v.grad.dtype) == (torch.float32,) * 2 + (torch.bfloat16,)


@pytest.mark.parametrize(("heads", "kv_heads", "n"), [(4, 2, 1), (4, 2, 37), (3, 3, 20), (6, 2, 9)])
@pytest.mark.parametrize("query_block", [8, 256])  # 37 tokens: 5 uneven blocks; 20: 3; 9: 2
def test_explicit_attention_matches_the_fused_kernel_with_gradients(
    monkeypatch, heads, kv_heads, n, query_block
):
    monkeypatch.setattr(attention, "QUERY_BLOCK", query_block)
    torch.manual_seed(0)
    q = torch.randn(1, heads, n, 16, requires_grad=True)
    k = torch.randn(1, kv_heads, n, 16, requires_grad=True)
    v = torch.randn(1, kv_heads, n, 16, requires_grad=True)
    grad = torch.randn(1, n, heads, 16)
    out = attention._explicit_causal(q, k, v, None)
    assert out.shape == (1, n, heads, 16) and out.dtype == torch.bfloat16
    got = (out.detach(), *torch.autograd.grad(out, (q, k, v), grad.bfloat16()))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    expected = expected.transpose(1, 2)
    want = (expected.detach(), *torch.autograd.grad(expected, (q, k, v), grad))
    for a, b in zip(got, want, strict=True):
        # bf16 scores and products; a 1-token sequence has no query gradient (one key: the
        # softmax is constant), hence the floor
        assert float((a.float() - b).norm()) < 2e-2 * max(float(b.norm()), 1.0)


def test_explicit_attention_takes_bf16_inputs_laid_out_as_the_model_hands_them():
    """Query, key and value may arrive in bf16 already (a model whose rotary embedding keeps
    bf16, or none) as strided views of [1, T, heads, dim] projections: same result as from
    fp32 copies of the same values."""
    torch.manual_seed(0)
    n = 11
    q = torch.randn(1, n, 4, 16).bfloat16().transpose(1, 2)
    k, v = (torch.randn(1, n, 2, 16).bfloat16().transpose(1, 2) for _ in "kv")
    assert not q.is_contiguous()
    got = attention._explicit_causal(q, k, v, None)
    want = attention._explicit_causal(q.float(), k.float(), v.float(), None)
    assert torch.equal(got, want)


@pytest.mark.parametrize("query_block", [5, 256])  # 3 blocks of 4 positions, or one block
def test_explicit_attention_never_lets_a_position_see_a_later_one(monkeypatch, query_block):
    """Exact, not within a tolerance: changing the key and value at position j leaves every
    earlier position's output bit for bit, for every head of each key/value group (query rows
    are reordered inside, so an off-by-one in the mask table would show for some head; query
    blocks slice the table and the keys, so an off-by-one there would show at a block edge)."""
    monkeypatch.setattr(attention, "QUERY_BLOCK", query_block)
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 6, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    base = attention._explicit_causal(q, k, v, 0.5)
    for j in range(12):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, j] += 3.0
        v2[:, :, j] += 3.0
        out = attention._explicit_causal(q, k2, v2, 0.5)
        assert torch.equal(out[:, :j], base[:, :j])
        assert not torch.equal(out[:, j], base[:, j])  # position j does see itself


def test_explicit_attention_blocks_change_no_value(monkeypatch):
    """Each query block's softmax sees all of its row's keys, so the outputs are the unblocked
    ones bit for bit; the key and value gradients sum the blocks' parts in another order."""
    torch.manual_seed(0)
    q = torch.randn(1, 6, 37, 16, requires_grad=True)
    k = torch.randn(1, 2, 37, 16, requires_grad=True)
    v = torch.randn(1, 2, 37, 16, requires_grad=True)
    grad = torch.randn(1, 37, 6, 16).bfloat16()
    results = []
    for block in (10**6, 8):
        monkeypatch.setattr(attention, "QUERY_BLOCK", block)
        out = attention._explicit_causal(q, k, v, None)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    (out0, *grads0), (out1, *grads1) = results
    assert torch.equal(out1, out0)
    for a, b in zip(grads1, grads0, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("pays", [True, False])
def test_packed_sdpa_under_cpu_bf16_autocast_attends_mid_lengths_explicitly(monkeypatch, pays):
    """Where it pays (AVX-512 BF16 without AMX), sequences of EXPLICIT_FROM..EXPLICIT_UP_TO
    tokens (lowered here to 6..8) take explicit bf16 attention, the rest the fused kernel."""
    kernel, explicit = [], []
    sdpa, exact = F.scaled_dot_product_attention, attention._explicit_causal
    monkeypatch.setattr(
        attention.F,
        "scaled_dot_product_attention",
        lambda q, *a, **k: kernel.append(q.shape[2]) or sdpa(q, *a, **k),
    )
    monkeypatch.setattr(
        attention, "_explicit_causal", lambda q, *a: explicit.append(q.shape[2]) or exact(q, *a)
    )
    monkeypatch.setattr(attention, "_explicit_pays", lambda: pays)
    monkeypatch.setattr(attention, "_amx", lambda: False)
    monkeypatch.setattr(attention, "EXPLICIT_FROM", 6)
    monkeypatch.setattr(attention, "EXPLICIT_UP_TO", 8)
    torch.manual_seed(0)
    lengths = [7, 5, 10, 6]
    q = torch.randn(1, 4, sum(lengths), 8, requires_grad=True)
    k, v = (torch.randn(1, 2, sum(lengths), 8, requires_grad=True) for _ in range(2))
    bounds = torch.tensor([0, *itertools.accumulate(lengths)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attention.packed_sdpa(torch.nn.Module(), q, k, v, None, cu_seq_lens_q=bounds)
    assert (explicit, kernel) == (([7, 6], [5, 10]) if pays else ([], lengths))
    assert out.dtype == torch.bfloat16 and out.shape == (1, sum(lengths), 4, 8)
    for s, e in itertools.pairwise(bounds.tolist()):
        expected = sdpa(
            *(t[:, :, s:e].detach() for t in (q, k, v)), is_causal=True, enable_gqa=True
        )
        torch.testing.assert_close(
            out[:, s:e].float(), expected.transpose(1, 2), atol=3e-2, rtol=3e-2
        )
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.isfinite().all() for t in (q, k, v))
    explicit.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # dropout: the fused kernel has it
        attention.packed_sdpa(torch.nn.Module(), q, k, v, None, dropout=0.1, cu_seq_lens_q=bounds)
    assert explicit == []


def _fake_varlen(signature: str):
    """A stand-in for PyTorch's CUDA-only varlen kernel, checking how it is called: the first
    release (is_causal, no scale, no GQA) or the later one (window_size, scale, enable_gqa)."""
    seen = []

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, **options):
        seen.append(options)
        assert q.dim() == 3 and cu_q.dtype == torch.int32 and cu_q is cu_k and max_q == max_k
        assert max_q == int(cu_q.diff().max())
        causal = options.get("is_causal") or options.get("window_size") == (-1, 0)
        assert causal, options
        if signature == "first":
            assert k.shape[1] == q.shape[1]  # no GQA in the first release: heads shared by copy
        out = [
            F.scaled_dot_product_attention(
                q[s:e].transpose(0, 1),
                k[s:e].transpose(0, 1),
                v[s:e].transpose(0, 1),
                is_causal=True,
                scale=options.get("scale"),
                enable_gqa=True,
            ).transpose(0, 1)
            for s, e in itertools.pairwise(cu_q.tolist())
        ]
        return torch.cat(out)

    args = {
        "first": {"is_causal"},
        "later": {"window_size", "scale", "enable_gqa"},
    }[signature]
    return kernel, seen, frozenset(args)


@pytest.mark.parametrize("signature", ["first", "later"])
def test_varlen_path_calls_either_pytorch_signature_and_matches_per_sequence(
    monkeypatch, signature
):
    kernel, seen, args = _fake_varlen(signature)
    monkeypatch.setattr(attention, "varlen_attn", kernel)
    monkeypatch.setattr(attention, "_VARLEN_ARGS", args)
    monkeypatch.setattr(attention, "varlen_available", lambda device: True)
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 17, 8), torch.randn(1, 2, 17, 8), torch.randn(1, 2, 17, 8)
    bounds = torch.tensor([0, 5, 14, 17])
    q, k = q.bfloat16(), k.bfloat16()  # bf16 compute: the kernel has no fp32
    out = attention._varlen(q, k, v.bfloat16(), bounds, 8**-0.5, 0.0, None)
    expected = attention._per_sequence(q, k, v.bfloat16(), bounds, 8**-0.5, 0.0, True)
    assert out is not None and len(seen) == 1
    torch.testing.assert_close(out, expected, atol=4e-3, rtol=2e-2)  # bf16 rounding
    # fp32 compute and dropout take the per-sequence path (the kernel has neither)
    assert attention._varlen(q.float(), k.float(), v, bounds, None, 0.0, None) is None
    assert attention._varlen(q, k, v.bfloat16(), bounds, None, 0.1, None) is None
    if signature == "first":  # no scale argument: only the default scale can be honoured
        assert attention._varlen(q, k, v.bfloat16(), bounds, 0.5, 0.0, None) is None


def test_a_failing_varlen_kernel_is_reported_once_and_per_sequence_attention_takes_over(
    monkeypatch,
):
    def broken(*args, **kwargs):
        broken.calls += 1
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")

    broken.calls = 0
    monkeypatch.setattr(attention, "varlen_attn", broken)
    monkeypatch.setattr(attention, "_VARLEN_ARGS", frozenset({"is_causal"}))
    monkeypatch.setattr(attention, "varlen_available", lambda device: True)
    monkeypatch.setattr(attention, "_varlen_failed", [])
    q = torch.randn(1, 2, 9, 8).bfloat16()
    bounds = torch.tensor([0, 4, 9])
    with pytest.warns(UserWarning, match="Ampere"):
        assert attention._varlen(q, q, q, bounds, None, 0.0, 5) is None
    assert attention._varlen(q, q, q, bounds, None, 0.0, 5) is None  # not tried again
    assert broken.calls == 1


def test_packed_lengths_are_read_once_per_row_not_once_per_layer(tokenizer, examples, monkeypatch):
    """On a GPU each read of the row's bounds waits for the device: one per forward, not one
    per layer; and a new row (or a row changed in place) is never served stale lengths."""
    model = gqa_model(len(tokenizer)).eval()  # 2 layers
    attention.use_packed_attention(model, False)
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.numel()) or tolist(t))
    batch = pack(examples, 512)
    with torch.no_grad():
        model(**model_inputs(batch))
    assert reads.count(len(examples)) == 1
    bounds = torch.tensor([0, 3, 7])
    assert attention._sequence_lengths(bounds) == [3, 4]
    assert attention._sequence_lengths(torch.tensor([0, 5, 7])) == [5, 2]
    bounds[1] = 1  # in place: a new version of the same tensor
    assert attention._sequence_lengths(bounds) == [1, 6]


def test_varlen_kernel_is_not_tried_before_ampere(monkeypatch):
    """PyTorch's flash kernels refuse pre-Ampere GPUs (T4, V100): per-sequence attention there,
    without a failed try and its warning on every run."""
    monkeypatch.setattr(attention, "varlen_attn", lambda *args, **kwargs: None)
    try:
        for capability, expected in (((7, 5), False), ((8, 0), True)):
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
            attention._ampere_or_newer.cache_clear()
            assert attention.varlen_available("cuda") is expected
        assert not attention.varlen_available("cpu")
    finally:
        attention._ampere_or_newer.cache_clear()


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_explicit_decode_matches_transformers_sdpa(mask_kind):
    """One new token per row against its cache (generation on CPU) attends through two matmuls
    instead of the fused kernel: the same values, with left padding masked out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    b, heads, kv_heads, n, dim = 3, 6, 2, 11, 16
    q = torch.randn(b, heads, 1, dim)
    k, v = torch.randn(b, kv_heads, n, dim), torch.randn(b, kv_heads, n, dim)
    seen = torch.ones(b, 1, 1, n, dtype=torch.bool)
    seen[0, ..., :4] = False  # a left-padded row
    seen[2, ..., :1] = False
    mask = {
        "bool": seen,
        "additive": torch.zeros(b, 1, 1, n).masked_fill(~seen, float("-inf")),
        "none": None,
    }[mask_kind]
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    module.eval()
    assert attention._decodes_explicitly(module, q, k, mask, 0.0)
    got, _ = attention.packed_sdpa(module, q, k, v, mask, scaling=0.3)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert got.shape == want.shape == (b, 1, heads, dim)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = attention.packed_sdpa(module, q, k, v, mask, scaling=0.3)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), want, atol=3e-2, rtol=3e-2)


def test_only_single_token_queries_on_cpu_decode_explicitly():
    module = torch.nn.Module().eval()
    q, k = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 5, 8)
    assert attention._decodes_explicitly(module, q, k, None, 0.0)
    assert not attention._decodes_explicitly(module, torch.randn(2, 4, 3, 8), k, None, 0.0)
    # a mask over more keys than the cache holds (a static cache): the kernel's way
    assert not attention._decodes_explicitly(module, q, k, torch.ones(2, 1, 1, 9).bool(), 0.0)
    assert not attention._decodes_explicitly(module.train(), q, k, None, 0.1)


def test_greedy_generation_with_left_padding_matches_sdpa(tokenizer, monkeypatch):
    """The same tokens from a GQA model whether it attends through packed_sdpa (which decodes
    explicitly) or transformers' SDPA, prompts of different lengths left-padded together."""
    from tunepilot.data.batching import collate_prompts

    calls = []
    decode = attention._explicit_decode
    monkeypatch.setattr(attention, "_explicit_decode", lambda *a: calls.append(1) or decode(*a))
    model = gqa_model(len(tokenizer)).eval()
    model.config.use_cache = True
    prompts = [tokenizer(t)["input_ids"] for t in ("hello there", "a much longer prompt here", "x")]
    input_ids, mask = collate_prompts(prompts, tokenizer.pad_token_id or 0)
    outputs = {}
    for impl in ("sdpa", attention.PACKED_SDPA):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            outputs[impl] = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=8,
                min_new_tokens=8,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or 0,
                output_scores=True,
                return_dict_in_generate=True,
            )
    want, got = outputs["sdpa"], outputs[attention.PACKED_SDPA]
    assert want.sequences.shape[1] == input_ids.shape[1] + 8
    assert torch.equal(want.sequences, got.sequences)
    # the scores too: a tiny random model's greedy tokens may not move when pads leak in
    for a, b in zip(want.scores, got.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert len(calls) == 7 * model.config.num_hidden_layers  # every token after the prompt's
