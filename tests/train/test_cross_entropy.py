"""The fused, chunked projection + cross-entropy equals the plain one, loss and gradients."""

import pytest
import torch
import torch.nn.functional as F

from tunepilot.train.cross_entropy import linear_cross_entropy


def plain(hidden, weight, targets, dtype):
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        logits = hidden @ weight.T
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def fused(hidden, weight, targets, dtype, chunk, weight_block_bytes=2**30):
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        return linear_cross_entropy(hidden, weight, targets, chunk, weight_block_bytes)


@pytest.mark.parametrize("weight_trains", [False, True])
@pytest.mark.parametrize("chunk", [7, 64])  # uneven chunks, and one chunk for everything
# the weight gradient in one block, or in blocks of two 7-row chunks (300 x 4 bytes a row)
@pytest.mark.parametrize("weight_block_bytes", [2**30, 300 * 4 * 14])
def test_matches_plain_cross_entropy_fp32(weight_trains, chunk, weight_block_bytes):
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = (torch.randn(300, 16) * 0.3).requires_grad_(weight_trains)
    targets = torch.randint(0, 300, (50,))
    results = []
    for f in (plain, lambda *a: fused(*a, chunk, weight_block_bytes)):
        hidden.grad = weight.grad = None
        loss = f(hidden, weight, targets, torch.float32)
        (loss * 0.5).backward()  # a non-unit upstream gradient must be applied too
        results.append((loss.detach(), hidden.grad.clone(), weight.grad))
    (l0, h0, w0), (l1, h1, w1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h1, h0, rtol=1e-4, atol=1e-6)
    if weight_trains:
        torch.testing.assert_close(w1, w0, rtol=1e-4, atol=1e-6)
    else:
        assert w0 is None and w1 is None


def test_bf16_autocast_stays_close():
    torch.manual_seed(0)
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = torch.randn(500, 32) * 0.1
    targets = torch.randint(0, 500, (40,))
    want = plain(hidden, weight, targets, torch.bfloat16)
    got = fused(hidden, weight, targets, torch.bfloat16, 16)
    want = float(want.detach())
    assert abs(float(got.detach()) - want) < 1e-2 * abs(want)


@pytest.mark.parametrize("weight_block_bytes", [2**30, 500 * 2 * 16])  # one block, or 3
def test_bf16_gradients_stay_close_to_autocast(weight_block_bytes):
    torch.manual_seed(0)
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = (torch.randn(500, 32) * 0.1).requires_grad_()
    targets = torch.randint(0, 500, (40,))
    grads = []
    for f in (plain, lambda *a: fused(*a, 16, weight_block_bytes)):
        hidden.grad = weight.grad = None
        (f(hidden, weight, targets, torch.bfloat16) * 0.25).backward()
        assert weight.grad.dtype == torch.float32
        grads.append((hidden.grad.clone(), weight.grad.clone()))
    (h0, w0), (h1, w1) = grads
    # both round the softmax gradient and the matmuls to bf16: agreement to bf16's precision
    torch.testing.assert_close(h1, h0, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(w1, w0, rtol=2e-2, atol=2e-3)


def test_no_grad_and_empty_inputs():
    weight = torch.randn(10, 4, requires_grad=True)
    with torch.no_grad():
        hidden = torch.randn(5, 4)
        targets = torch.randint(0, 10, (5,))
        torch.testing.assert_close(
            fused(hidden, weight, targets, torch.float32, 2),
            plain(hidden, weight, targets, torch.float32),
        )
    empty = torch.zeros(0, 4, requires_grad=True)
    loss = linear_cross_entropy(empty, weight, torch.zeros(0, dtype=torch.long))
    assert float(loss.detach()) == 0.0
    loss.backward()  # still part of the graph


def _bf16_loss(hidden, weight, targets) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return linear_cross_entropy(hidden, weight, targets)


def _reference(hidden, weight, targets) -> torch.Tensor:
    logits = (hidden.bfloat16() @ weight.detach().bfloat16().T).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def test_a_frozen_head_is_cast_once_and_again_when_its_values_change(monkeypatch):
    """LoRA's tied fp32 head: cast to bf16 for the first micro-batch and reused; a checkpoint
    restored into it (an in-place copy) makes the next forward cast the new values."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 16), requires_grad=False)
    hidden = torch.randn(10, 16, requires_grad=True)
    targets = torch.randint(0, 64, (10,))
    casts = []
    original_to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        if self.shape == weight.shape and self.dtype == torch.float32 and torch.bfloat16 in args:
            casts.append(1)  # the head cast down
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    first = _bf16_loss(hidden, weight, targets)
    _bf16_loss(hidden, weight, targets).backward()
    assert len(casts) == 1
    with torch.no_grad():
        weight.copy_(torch.randn(64, 16))  # what restoring a checkpoint does
    after = _bf16_loss(hidden, weight, targets)
    assert len(casts) == 2
    monkeypatch.undo()
    assert after != first
    assert torch.allclose(after, _reference(hidden, weight, targets), rtol=1e-5)


def test_a_trained_head_is_seen_with_its_new_values_after_each_fused_adamw_step():
    """Fused AdamW updates in place without bumping the version counter: a cache keyed on it
    would keep computing logits from the head's first values."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 16))
    hidden, targets = torch.randn(10, 16), torch.randint(0, 64, (10,))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    for _ in range(3):
        loss = _bf16_loss(hidden, weight, targets)
        assert torch.allclose(loss, _reference(hidden, weight, targets), rtol=1e-5)
        loss.backward()
        version = weight._version
        optimizer.step()
        optimizer.zero_grad()
        assert weight._version == version  # why no cache can rely on it


def test_the_cast_head_goes_with_its_model():
    from tunepilot.train import cross_entropy

    weight = torch.nn.Parameter(torch.randn(64, 16), requires_grad=False)
    _bf16_loss(torch.randn(3, 16), weight, torch.randint(0, 64, (3,)))
    assert cross_entropy._cast is not None
    del weight  # a sweep's finished trial: its bf16 copy must not stay behind
    assert cross_entropy._cast is None


def test_confident_targets_keep_their_gradient_in_bf16():
    """p - 1 for a target the model is sure of (p = 0.999) must come out right in bf16: p rounded
    to bf16 near 1 has a step of 1/256, so subtracting 1 afterwards would give 0 or -0.0039."""
    torch.manual_seed(0)
    targets = torch.arange(8)
    weight = 0.1 * torch.randn(64, 16)
    weight[targets, targets] += 3.5
    hidden = (3.5 * F.one_hot(targets, 16).float()).requires_grad_(True)  # target logits ~12
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear_cross_entropy(hidden, weight, targets).backward()
    # reference: the same bf16 logits, softmax and gradient in float64
    h, w = hidden.detach().bfloat16().double(), weight.bfloat16().double()
    probs = torch.softmax(h @ w.T, dim=-1)
    assert probs[torch.arange(8), targets].min() > 0.99  # the case this test is about
    expected = (probs - F.one_hot(targets, 64).double()) @ w
    error = (hidden.grad.double() - expected).norm() / expected.norm()
    assert error < 2e-2
