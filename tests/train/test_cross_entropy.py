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
    assert abs(float(got.detach()) - float(want)) < 1e-2 * abs(float(want))


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
    assert float(loss) == 0.0
    loss.backward()  # still part of the graph


def test_a_low_precision_head_is_cast_once_per_value_of_the_weight(monkeypatch):
    """A tied fp32 head is cast to bf16 for the first micro-batch and reused while it is
    unchanged; an in-place optimizer update makes the next forward cast the new values."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 16))
    hidden, targets = torch.randn(10, 16), torch.randint(0, 64, (10,))
    casts = []
    original_to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        if self.shape == weight.shape and self.dtype == torch.float32 and torch.bfloat16 in args:
            casts.append(1)  # the head cast down (the gradient's casts go the other way)
        return original_to(self, *args, **kwargs)

    def loss() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return linear_cross_entropy(hidden, weight, targets)

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    first = loss()
    loss().backward()
    assert len(casts) == 1
    with torch.no_grad():
        weight.add_(weight.grad, alpha=-1.0)  # what an optimizer step does
    after = loss()
    assert len(casts) == 2
    monkeypatch.undo()
    # the updated weight's values, not the cached cast of the old ones
    logits = (hidden.bfloat16() @ weight.detach().bfloat16().T).float()
    expected = F.cross_entropy(logits, targets, reduction="sum")
    assert after != first
    assert torch.allclose(after, expected, rtol=1e-5)


def test_the_cast_head_goes_with_its_model():
    from tunepilot.train import cross_entropy

    weight = torch.nn.Parameter(torch.randn(64, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear_cross_entropy(torch.randn(3, 16), weight, torch.randint(0, 64, (3,)))
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
