"""fp32 products through oneDNN (train/matmul.py): the same values and gradients as PyTorch's
default, used where the run routes them and nowhere else."""

import pytest
import torch

from tests.conftest import tiny_model, with_live_lora
from tunepilot import model as models
from tunepilot.data.batching import pack
from tunepilot.data.tokenize import Tokenized
from tunepilot.train import matmul, step
from tunepilot.train.cross_entropy import linear_cross_entropy

pytestmark = pytest.mark.skipif(not matmul.available(), reason="no oneDNN product in this build")


@pytest.fixture(autouse=True)
def as_measured():
    yield
    matmul.use_onednn(None)


@pytest.fixture
def calls(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of the products oneDNN computed."""
    seen: list[tuple[int, ...]] = []
    real = matmul._onednn_linear

    def spy(x, weight, bias):
        seen.append((*x.shape, weight.shape[0]))
        return real(x, weight, bias)

    monkeypatch.setattr(matmul, "_onednn_linear", spy)
    return seen


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_a_routed_linear_layer_matches_the_default(bias, weight_trains, calls):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    weight = torch.randn(24, 16, requires_grad=weight_trains)
    b = torch.randn(24, requires_grad=True) if bias else None
    upstream = torch.randn(3, 5, 24)
    results = []
    for on in (False, True):
        matmul.use_onednn(on)
        x.grad = weight.grad = None
        y = matmul.linear(x, weight, b)
        y.backward(upstream)
        grads = [x.grad] + ([weight.grad] if weight_trains else [])
        results.append((y.detach(), grads, None if b is None else b.grad.clone()))
        if b is not None:
            b.grad = None
    (y0, g0, b0), (y1, g1, b1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    for a, ref in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(b1, b0, rtol=1e-5, atol=1e-5)
    # forward, input gradient and (when the weight trains) weight gradient
    assert len(calls) == 2 + weight_trains


def _packed_batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    rows = [
        Tokenized(
            torch.randint(3, vocab, (n,), generator=g).tolist(),
            [i > 3 for i in range(n)],
            0,
            None,
            "test",
        )
        for n in (9, 14, 6)
    ]
    return pack(rows, 32)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_training_step_routed_gives_the_default_loss_and_gradients(method, checkpointing, calls):
    """The whole step (linear layers, LoRA adapters, the fused loss's head) through oneDNN
    against the same step through PyTorch's default: the same function, other rounding. With
    gradient checkpointing the forward runs again in backward, and must take the same path."""
    model = tiny_model(vocab_size=512)
    if method == "lora":
        model = with_live_lora(model, 0.02)
    if checkpointing:
        models.enable_gradient_checkpointing(model)
    assert matmul.route(model) == sum(type(m) is torch.nn.Linear for m in model.modules())
    model.train()
    batch = _packed_batch(512)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for on in (False, True):
        matmul.use_onednn(on)
        model.zero_grad(set_to_none=True)
        loss, _ = step.accumulate(model, [batch], "fp32", "cpu", None)
        results.append((loss, [p.grad.clone() for p in params]))
    (l0, g0), (l1, g1) = results
    assert l1 == pytest.approx(l0, rel=1e-5)
    for a, ref in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-6)
    linear_layers = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert len(calls) > linear_layers  # forwards and their gradients
    assert any(shape[-1] == 512 for shape in calls)  # the output head's logits


def test_nothing_is_routed_under_autocast_or_when_off(calls):
    """bf16 products are oneDNN's already; a bf16 step must not go through the mode at all."""
    model = tiny_model(vocab_size=512).train()
    matmul.route(model)
    batch = _packed_batch(512)
    matmul.use_onednn(True)
    step.accumulate(model, [batch], "bf16", "cpu", None)
    matmul.use_onednn(False)
    step.accumulate(model, [batch], "fp32", "cpu", None)
    assert calls == []


def test_the_fused_loss_routes_its_head_products(calls):
    torch.manual_seed(0)
    hidden = torch.randn(40, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (40,))
    results = []
    for on in (False, True):
        matmul.use_onednn(on)
        hidden.grad = weight.grad = None
        loss = linear_cross_entropy(hidden, weight, targets, chunk=16)
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
    for a, ref in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-5)
    # per 16-row chunk: logits and the hidden gradient; one weight-gradient block
    assert len(calls) == 3 * 2 + 1


def test_the_choice_follows_the_measurement(monkeypatch):
    monkeypatch.setattr(matmul, "onednn_speedup", lambda: 2.2)
    assert matmul.enabled()
    assert matmul.choice() == ("onednn", "oneDNN, measured 2.2x MKL's fp32 speed here")
    monkeypatch.setattr(matmul, "onednn_speedup", lambda: 1.05)
    assert not matmul.enabled()
    library, why = matmul.choice()
    assert library == "mkl" and "1.05x" in why
    monkeypatch.setattr(matmul, "onednn_speedup", lambda: 0.0)  # the product failed its check
    assert not matmul.enabled()


def test_the_measurement_is_a_speed_ratio():
    assert matmul.onednn_speedup() > 0


def test_layers_given_back_to_the_compiler_compute_as_their_class_does(calls):
    model = tiny_model(vocab_size=512)
    matmul.route(model)
    assert matmul.route(model) == 0  # already routed
    layer = model.model.layers[0]
    matmul.unroute([layer])
    matmul.use_onednn(True)
    layer.mlp.down_proj(torch.randn(3, layer.mlp.down_proj.in_features))
    assert calls == []
    assert matmul.route(model) == sum(type(m) is torch.nn.Linear for m in layer.modules())


@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_benchmarks_baselines_get_the_layers_users_get(method, tiny_model_dir):
    """benchmarks/compare.py trains the Trainer and TRL on load_trainable(fast=False): the same
    weights as tunepilot's model, none of its forwards (until session 25 they carried
    tunepilot's norms, shared matmuls and fused adapter sums, and briefly its oneDNN route)."""
    from tunepilot.config import load_config
    from tunepilot.run import load_trainable

    cfg = load_config(None, overrides=[f"model={tiny_model_dir}", f"method={method}"])
    source = models.resolve(cfg.model)
    fast, plain = load_trainable(cfg, source), load_trainable(cfg, source, fast=False)
    assert any("forward" in vars(m) for m in fast.modules())
    assert not any("forward" in vars(m) for m in plain.modules())
    fast_state, plain_state = fast.state_dict(), plain.state_dict()
    assert fast_state.keys() == plain_state.keys()
    for name, value in plain_state.items():
        assert torch.equal(value, fast_state[name]), name
