"""LR finder: the range test's suggestion and early stop, the mini-sweep's pick, exact restores,
and the files it writes. Tiny Llama + LoRA on the real tokenizer; a few seconds each."""

import copy
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from tests.conftest import tiny_model, tokenized_chat
from tunepilot.data.batching import collate
from tunepilot.data.tokenize import Tokenized
from tunepilot.model import add_lora
from tunepilot.plan.lr_find import (
    MIN_RANGE_STEPS,
    StepSetup,
    find_learning_rate,
    lr_range_test,
    mini_sweep,
    pick,
    suggest,
    sweep_candidates,
)
from tunepilot.train.optim import build_optimizer
from tunepilot.train.step import accumulate, update


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from more threads, and on a busy machine OpenMP's spin-waits
    make each step 10x slower (measured: 0.5 s vs 0.02 s per step with the CPU shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tokenizer_dir: Path) -> tuple[list[Tokenized], list[Tokenized], int]:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)

    return tokenized_chat(tok, 32), tokenized_chat(tok, 8, seed=9), tok.unk_token_id


def lora_model(dropout: float = 0.1) -> torch.nn.Module:
    model = tiny_model()
    for p in model.parameters():
        p.requires_grad_(False)
    # dropout > 0 draws from the torch RNG every step, so restoring the RNG is really tested
    return add_lora(model, 4, 8, dropout, "all-linear")


def setup(pad_id: int) -> StepSetup:
    return StepSetup(
        pad_id=pad_id,
        max_length=128,
        global_batch=4,
        micro_batch=2,
        precision="fp32",
        device="cpu",
        method="lora",
        weight_decay=0.0,
        seed=0,
        default_lr=2e-4,
    )


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_params(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    changed = [n for n, v in before.items() if not torch.equal(after[n], v)]
    assert not changed, f"not restored bit-exactly: {changed[:3]}"
    assert all(p.grad is None for p in model.parameters())


def rng_now() -> tuple:
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()


def test_suggest_is_the_steepest_descent_per_decade():
    lrs = list(np.logspace(-6, 0, 61))
    # a smooth drop centred at 1e-4, then a rise: steepest descent is at 1e-4, minimum near 1e-2
    curve = [
        2 - math.tanh(2 * (math.log10(lr) + 4)) + max(0.0, math.log10(lr) + 2) ** 2 for lr in lrs
    ]
    found = suggest(lrs, curve, diverged=True)
    assert found["rule"] == "steepest descent"
    assert found["suggestion"] == pytest.approx(1e-4, rel=0.3)
    assert 1e-3 <= found["min_loss_lr"] <= 1e-1
    flat = suggest(lrs[:20], [3.0] * 20, diverged=False)
    assert flat["rule"].startswith("minimum / 10")


def test_sweep_candidates_round_clip_and_add_the_default():
    assert sweep_candidates(3e-4, "lora", default_lr=2e-4) == [1e-4, 3e-4, 9e-4]
    # far from the default: the rule's LR joins as a baseline
    assert sweep_candidates(3e-5, "lora", default_lr=2e-4) == [1e-5, 3e-5, 9e-5, 2e-4]
    # never above the sane bound or where the range test's loss bottomed out; no duplicates
    assert sweep_candidates(5e-2, "lora", ceiling=2e-3) == [2e-3]
    assert sweep_candidates(1e-9, "full") == [1e-6]


def test_range_test_restores_weights_optimizer_and_rng_exactly(data):
    train, _, pad_id = data
    model = lora_model()
    # an optimizer with moments already in it: the test must hand it back untouched
    optimizer = build_optimizer(model, 1e-3, 0.0, "cpu")
    model.train()
    accumulate(model, [collate(train[:2], 128, pad_id)], "fp32", "cpu", None)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    weights, opt_state, rng = params_of(model), copy.deepcopy(optimizer.state_dict()), rng_now()
    model.eval()

    # 40 steps asked, no time: the ramp is shortened to the floor and still ends at lr_max
    rt = lr_range_test(
        model, train, setup(pad_id), steps=40, time_budget_s=0.0, optimizer=optimizer
    )

    assert rt["steps"] == MIN_RANGE_STEPS and rt["stop"] == "time budget"
    assert rt["lrs"][0] == pytest.approx(rt["lr_min"]) and rt["lrs"][-1] == pytest.approx(1e-1)
    assert all(math.isfinite(v) for v in rt["losses"] + rt["smoothed"])
    assert math.isfinite(rt["suggestion"]) and rt["lr_min"] <= rt["suggestion"] <= rt["lr_max"]
    assert_same_params(model, weights)
    assert not model.training
    state = optimizer.state_dict()
    assert state["param_groups"] == opt_state["param_groups"]
    for key, moments in opt_state["state"].items():
        for name, value in moments.items():
            assert torch.equal(state["state"][key][name], value), (key, name)
    assert rng_now()[0] == rng[0] and rng_now()[1] == rng[1]
    assert torch.equal(rng_now()[2], rng[2])


def test_range_test_stops_early_when_the_loss_blows_up(data):
    train, _, pad_id = data
    model = lora_model(dropout=0.0)
    weights = params_of(model)
    rt = lr_range_test(model, train, setup(pad_id), steps=40, lr_min=1e-2, lr_max=1e6)
    assert rt["stop"] in ("diverged", "non-finite")
    assert rt["steps"] < 40
    # the suggestion comes from the region before the blow-up
    assert rt["suggestion"] < rt["lrs"][-1]
    assert_same_params(model, weights)


def test_mini_sweep_picks_the_lowest_held_out_loss_and_restores(data):
    train, eval_, pad_id = data
    model = lora_model()
    weights = params_of(model)
    sweep = mini_sweep(model, train, eval_, setup(pad_id), candidates=[1e-6, 1e-2, 1e3], steps=6)

    assert [c["lr"] for c in sweep] == [1e-6, 1e-2, 1e3]
    assert sweep[2]["diverged"] and sweep[2]["eval_loss"] == math.inf
    assert pick(sweep)["lr"] == min(sweep, key=lambda c: c["eval_loss"])["lr"] == 1e-2
    assert_same_params(model, weights)
    # every candidate starts from the same state and RNG: alone, 1e-2 scores exactly the same
    alone = mini_sweep(model, train, eval_, setup(pad_id), candidates=[1e-2], steps=6)
    assert alone[0]["eval_loss"] == sweep[1]["eval_loss"]


def test_find_learning_rate_writes_plot_and_json(data, tmp_path: Path):
    train, eval_, pad_id = data
    model = lora_model(dropout=0.0)
    weights = params_of(model)
    result = find_learning_rate(
        model,
        train,
        eval_,
        setup(pad_id),
        out_dir=tmp_path / "lrf",
        range_steps=MIN_RANGE_STEPS,
        sweep_steps=4,
    )
    assert_same_params(model, weights)
    assert result.plot == tmp_path / "lrf" / "lr_find.png"
    assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "lrf" / "lr_find.json").read_text())
    assert saved["chosen"] == result.chosen == pick(result.sweep)["lr"]
    assert len(saved["range_test"]["lrs"]) == len(saved["range_test"]["smoothed"])
    assert {"lr", "eval_loss", "chosen"} <= saved["sweep"][0].keys()
    assert "range test suggests" in result.reason and "mini-sweep" in result.reason
    assert "\n" not in result.reason

    # the finder leaves no trace: training afterwards is what it would have been
    trained = lora_model(dropout=0.0)
    for m in (model, trained):
        torch.manual_seed(1)
        opt = build_optimizer(m, 1e-2, 0.0, "cpu")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        accumulate(m, [collate(train[:4], 128, pad_id)], "fp32", "cpu", None)
        update([p for p in m.parameters() if p.requires_grad], opt, sched, None, 1.0)
    assert_same_params(model, params_of(trained))
