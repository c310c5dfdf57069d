"""A measured learning rate: an LR range test, then a held-out mini-sweep around its suggestion.

Stage 1, the range test (Smith, "Cyclical Learning Rates", 2015; fastai's ``lr_find``): train
from the model's current state for a few dozen steps while the learning rate grows
exponentially from ``lr_min`` to ``lr_max``; smooth the loss (EMA, beta 0.98, bias-corrected);
stop when the smoothed loss passes 4x its best or anything is non-finite; suggest the LR where
the smoothed loss falls fastest per decade of LR (and report the LR of its minimum / 10).

Range tests alone mislead on transformers: each point is the loss of a model that spent one
step at that LR, a 0.98 EMA averages ~50 steps so the curve is drawn late (the steepest point
sits right of the true one), and AdamW's first steps are large whatever the LR. Stage 2
therefore trains a few candidates around the suggestion, each from the same initial state on
the same batches, with the run's schedule shape compressed into a few dozen steps, and keeps
the one with the lowest held-out loss. Short runs favour larger LRs (the "short-horizon bias"):
the sweep is a sanity check of the range test, not a substitute for the full run.

Both stages train exactly like the loop: the run's batches (``global_batch_at``), its
token-normalised loss (``accumulate``), its AdamW groups, clipping and autocast. Afterwards the
trainable weights, an optimizer handed in, and the python/numpy/torch RNGs are restored
bit-exactly, so the real run starts from the state it would have had without the finder.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tunepilot.data.batching import Batch, global_batch_at, micro_batches
from tunepilot.data.tokenize import Tokenized
from tunepilot.errors import RunError
from tunepilot.evaluate import eval_loss
from tunepilot.train import checkpoint as ckpt
from tunepilot.train.optim import build_optimizer, build_scheduler
from tunepilot.train.step import accumulate, clip, make_scaler, update

#: range-test span by method. LoRA's B starts at zero, so below ~1e-6 nothing moves in a few
#: dozen steps; full fine-tunes diverge around 1e-3, so a decade above that is enough.
RANGE_BOUNDS = {"lora": (1e-6, 1e-1), "full": (1e-7, 1e-2)}
#: where sweep candidates may go, whatever the range test says
SANE_BOUNDS = {"lora": (1e-5, 3e-3), "full": (1e-6, 3e-4)}
BETA = 0.98  # EMA of the range-test loss (fastai's value)
DIVERGE = 4.0  # stop when the smoothed loss exceeds this multiple of its best
MIN_RANGE_STEPS = 15  # a shorter curve has no shape; the time budget yields to this floor
MIN_SWEEP_STEPS = 8  # fewer steps only measure who moves fastest: the largest LR always wins
SWEEP_FACTORS = (1 / 3, 1.0, 3.0)
DEFAULT_FAR = 2.0  # the rule's LR joins the sweep when this far (ratio) from every candidate

Log = Callable[[str], None]


@dataclass(frozen=True)
class StepSetup:
    """How one optimizer step is taken: the finder trains exactly like the run it serves."""

    pad_id: int
    max_length: int
    global_batch: int
    micro_batch: int
    precision: str  # "fp32" | "bf16" | "fp16"
    device: str
    method: str  # "lora" | "full": picks the LR bounds
    weight_decay: float
    seed: int  # the data order: the finder sees the run's first batches
    max_grad_norm: float = 1.0
    scheduler: str = "cosine"  # the sweep compresses the run's schedule shape
    warmup_ratio: float = 0.05
    default_lr: float | None = None  # the rule's LR, swept for comparison when far away
    packing: bool = False

    @classmethod
    def from_plan(cls, plan: Any, method: str, pad_id: int, seed: int) -> StepSetup:
        """From a ``tunepilot.plan.plan.Plan`` (its ``learning_rate`` is the rule's value)."""
        total = max(1, plan["total_steps"])
        return cls(
            pad_id=pad_id,
            max_length=plan["max_length"],
            global_batch=plan["global_batch_size"],
            micro_batch=plan["micro_batch_size"],
            precision=plan["precision"],
            device=plan.hardware.device,
            method=method,
            weight_decay=plan["weight_decay"],
            seed=seed,
            max_grad_norm=plan["max_grad_norm"],
            scheduler=plan["scheduler"],
            warmup_ratio=plan["warmup_steps"] / total,
            default_lr=plan["learning_rate"] if _is_number(plan["learning_rate"]) else None,
            packing=plan["packing"],
        )


@dataclass
class LRFindResult:
    suggestion: float  # the range test's steepest-descent LR
    chosen: float  # the LR to train with: the sweep's best on held-out loss
    range_test: dict[str, Any]
    sweep: list[dict[str, Any]]
    plot: Path | None
    reason: str  # one line for the plan table: both stages and their numbers


# -- state that must come back exactly -----------------------------------------------------


@dataclass
class _Saved:
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    rng: dict[str, Any]
    cuda_rng: list[torch.Tensor] | None
    training: bool


def _save(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> _Saved:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return _Saved(
        ckpt.trainable_state(model),
        copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None,
        ckpt.rng_state(),
        cuda,
        model.training,
    )


def _restore(saved: _Saved, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in saved.weights.items():
            params[name].copy_(value)
    for p in model.parameters():
        p.grad = None
    if optimizer is not None and saved.optimizer is not None:
        # a copy: load_state_dict keeps tensors that need no cast, and training would mutate them
        optimizer.load_state_dict(copy.deepcopy(saved.optimizer))
    ckpt.set_rng_state(saved.rng)
    if saved.cuda_rng is not None:
        torch.cuda.set_rng_state_all(saved.cuda_rng)
    model.train(saved.training)


# -- stage 1: the range test ---------------------------------------------------------------


def _batches(train: list[Tokenized], position: int, setup: StepSetup) -> list[Batch]:
    """The run's own global batch at ``position``, split into its micro-batches."""
    _, indices = global_batch_at(position, len(train), setup.global_batch, setup.seed)
    examples = [train[i] for i in indices]
    return micro_batches(examples, setup.micro_batch, setup.max_length, setup.pad_id, setup.packing)


def _range_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    batches: list[Batch],
    setup: StepSetup,
    lr: float,
) -> tuple[float, float]:
    """One step at ``lr`` (the ramp replaces the scheduler); returns (loss, grad norm)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss, _ = accumulate(model, batches, setup.precision, setup.device, scaler)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = clip(params, optimizer, scaler, setup.max_grad_norm)
    if math.isfinite(loss) and (scaler is not None or math.isfinite(norm)):
        if scaler is not None:
            scaler.step(optimizer)  # skips the step itself when fp16 gradients overflowed
            scaler.update()
        else:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, norm


def _ramp(i: int, steps: int, elapsed_s: float, budget_s: float) -> float:
    """Where step ``i`` sits on the exponential ramp, 0 (lr_min) to 1 (lr_max).

    Paced by step count or by wall time, whichever is ahead, so a slow machine still sweeps the
    whole range within the budget; monotone even when the pace changes (a shared CPU), and
    never faster than MIN_RANGE_STEPS points for the whole ramp (a shorter curve has no shape).
    """
    by_steps = i / max(steps - 1, 1)
    by_time = elapsed_s / budget_s if budget_s > 0 else math.inf
    fastest = i / max(min(steps, MIN_RANGE_STEPS) - 1, 1)
    return min(1.0, max(by_steps, min(by_time, fastest)))


def lr_range_test(
    model: nn.Module,
    train: list[Tokenized],
    setup: StepSetup,
    *,
    steps: int = 50,
    lr_min: float | None = None,
    lr_max: float | None = None,
    time_budget_s: float = 120.0,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Loss against an exponentially growing LR; the model (and ``optimizer``) come back exact.

    Without ``optimizer`` a fresh one is built as the run would (``build_optimizer``); with one,
    its moments are used and its state is restored afterwards. When ``steps`` would not fit
    ``time_budget_s``, the ramp follows the clock instead (it still ends at ``lr_max``).
    Returns lrs, losses, smoothed losses, the suggestion and how the test stopped ("completed";
    "time budget": paced by the clock, still reached ``lr_max``; "diverged"; "non-finite").
    """
    lo, hi = RANGE_BOUNDS[setup.method]
    lr_min, lr_max = lr_min or lo, lr_max or hi
    if not 0 < lr_min < lr_max:
        raise ValueError(f"need 0 < lr_min < lr_max, got {lr_min:g} and {lr_max:g}")
    saved = _save(model, optimizer)
    start = time.perf_counter()
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    seconds: list[float] = []
    stop, position, avg, best = "completed", 0, 0.0, math.inf
    try:
        opt = optimizer or build_optimizer(model, lr_min, setup.weight_decay, setup.device)
        scaler = make_scaler(setup.precision, setup.device)
        model.train()
        while position < 10 * steps + 10:  # a bound, should every batch lack targets
            frac = _ramp(len(lrs), steps, time.perf_counter() - start, time_budget_s)
            lr = lr_min * (lr_max / lr_min) ** frac
            batches = _batches(train, position, setup)
            position += 1
            if sum(b.supervised_tokens for b in batches) == 0:
                continue  # nothing to learn from (the guardian skips these too)
            tick = time.perf_counter()
            loss, norm = _range_step(model, opt, scaler, batches, setup, lr)
            seconds.append(time.perf_counter() - tick)
            lrs.append(lr)
            losses.append(loss)
            if not math.isfinite(loss) or (scaler is None and not math.isfinite(norm)):
                smoothed.append(math.nan)
                stop = "non-finite"
                break
            avg = BETA * avg + (1 - BETA) * loss
            smoothed.append(avg / (1 - BETA ** len(lrs)))
            best = min(best, smoothed[-1])
            if smoothed[-1] > DIVERGE * best:
                stop = "diverged"
                break
            if frac >= 1.0:
                stop = "completed" if len(lrs) >= steps else "time budget"
                break
    finally:
        _restore(saved, model, optimizer)
    return {
        "method": setup.method,
        "lr_min": lr_min,
        "lr_max": lr_max,
        "lrs": lrs,
        "losses": losses,
        "smoothed": smoothed,
        "stop": stop,
        "steps": len(lrs),
        "seconds": time.perf_counter() - start,
        "seconds_per_step": float(np.median(seconds)) if seconds else math.nan,
    } | suggest(lrs, smoothed, diverged=stop in ("diverged", "non-finite"))


def suggest(lrs: list[float], smoothed: list[float], *, diverged: bool) -> dict[str, Any]:
    """Steepest descent of the smoothed loss per decade of LR, before divergence.

    The first tenth of the curve (at least 2 points) is skipped: the EMA there averages only a
    few batches, so its slope is batch-to-batch noise, not learning. Without any descent the
    suggestion falls back to the LR of the minimum / 10 (fastai's rule of thumb).
    """
    end = len(smoothed) - 1 if diverged else len(smoothed)  # the diverged point is excluded
    if end < 1:
        return {"suggestion": math.nan, "rule": "no usable point", "min_loss_lr": math.nan}
    x = np.log10(np.asarray(lrs[:end]))
    y = np.asarray(smoothed[:end])
    low = int(np.argmin(y))
    min_loss_lr = float(lrs[low])
    skip = max(2, end // 10)
    if end - skip >= 2:
        slopes = np.gradient(y, x)
        steepest = skip + int(np.argmin(slopes[skip:]))
        if slopes[steepest] < 0:
            return {
                "suggestion": float(lrs[steepest]),
                "rule": "steepest descent",
                "steepest_slope_per_decade": float(slopes[steepest]),
                "min_loss_lr": min_loss_lr,
                "min_loss_lr_div10": min_loss_lr / 10,
            }
    return {
        "suggestion": max(min_loss_lr / 10, float(lrs[0])),
        "rule": "minimum / 10 (no descent found)",
        "min_loss_lr": min_loss_lr,
        "min_loss_lr_div10": min_loss_lr / 10,
    }


# -- stage 2: the held-out mini-sweep ------------------------------------------------------


def _sig2(x: float) -> float:
    return float(f"{x:.1e}")


def _clip(lr: float, method: str, ceiling: float | None) -> float:
    lo, hi = SANE_BOUNDS[method]
    if ceiling is not None and math.isfinite(ceiling):
        hi = max(lo, min(hi, ceiling))
    return _sig2(min(max(lr, lo), hi))


def sweep_candidates(
    center_lr: float, method: str, default_lr: float | None = None, ceiling: float | None = None
) -> list[float]:
    """center x {1/3, 1, 3}, rounded to 2 significant digits, clipped to the method's sane
    bounds and to ``ceiling`` (where the range test's loss bottomed out), plus the rule's LR
    when it is more than 2x from every candidate. Sorted, without duplicates."""
    lrs = {_clip(center_lr * f, method, ceiling) for f in SWEEP_FACTORS}
    if default_lr and all(max(default_lr / c, c / default_lr) > DEFAULT_FAR for c in lrs):
        lrs.add(default_lr)
    return sorted(lrs)


def _train_candidate(
    model: nn.Module,
    train: list[Tokenized],
    held_out: list[Tokenized],
    setup: StepSetup,
    lr: float,
    steps: int,
) -> dict[str, Any]:
    """``steps`` steps of the run's loop at peak ``lr`` (schedule compressed), then eval loss."""
    tick = time.perf_counter()
    optimizer = build_optimizer(model, lr, setup.weight_decay, setup.device)
    warmup = max(1, math.ceil(setup.warmup_ratio * steps)) if setup.warmup_ratio > 0 else 0
    scheduler = build_scheduler(optimizer, setup.scheduler, warmup, steps)
    scaler = make_scaler(setup.precision, setup.device)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    losses: list[float] = []
    for position in range(steps):  # the same first batches for every candidate (and the run)
        loss, _ = accumulate(
            model, _batches(train, position, setup), setup.precision, setup.device, scaler
        )
        if not math.isfinite(loss):
            break
        update(params, optimizer, scheduler, scaler, setup.max_grad_norm)
        losses.append(loss)
    diverged = len(losses) < steps
    held = math.inf
    if not diverged:
        held = eval_loss(
            model,
            held_out,
            setup.max_length,
            setup.pad_id,
            setup.micro_batch,
            setup.precision,
            setup.device,
        )
    return {
        "lr": lr,
        "eval_loss": held if math.isfinite(held) else math.inf,
        "train_loss_last": float(np.mean(losses[-5:])) if losses else math.nan,
        "steps": len(losses),
        "diverged": diverged or not math.isfinite(held),
        "seconds": time.perf_counter() - tick,
    }


def mini_sweep(
    model: nn.Module,
    train: list[Tokenized],
    eval_: list[Tokenized],
    setup: StepSetup,
    *,
    candidates: list[float],
    steps: int = 24,
    max_eval: int = 64,
    log: Log | None = None,
) -> list[dict[str, Any]]:
    """Train each candidate LR from the same initial state for ``steps`` steps and measure the
    loss on the first ``max_eval`` held-out examples; the model comes back exact after each.

    One dict per candidate: lr, eval_loss (inf when it diverged), train_loss_last, steps,
    diverged, seconds. ``pick`` chooses among them.
    """
    held_out = eval_[:max_eval]
    saved = _save(model, None)
    results = []
    try:
        for lr in candidates:
            results.append(_train_candidate(model, train, held_out, setup, lr, steps))
            _restore(saved, model, None)  # the RNG too: every candidate draws the same dropout
            if log:
                r = results[-1]
                log(f"  lr {lr:.1e}: held-out loss {r['eval_loss']:.4f} ({r['seconds']:.0f}s)")
    finally:
        _restore(saved, model, None)
    return results


def pick(sweep: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The candidate with the lowest held-out loss; ties go to the smaller LR (the safer one)."""
    finite = [c for c in sweep if math.isfinite(c["eval_loss"])]
    return min(finite, key=lambda c: (c["eval_loss"], c["lr"]), default=None)


# -- both stages ---------------------------------------------------------------------------


def _sweep_steps(
    wanted: int, budget_s: float, step_s: float, n_candidates: int, n_eval: int, setup: StepSetup
) -> int:
    """Steps per candidate that fit the budget at the range test's pace (an eval batch costs
    about a third of a training step: forward only)."""
    if not math.isfinite(step_s) or step_s <= 0:
        return wanted
    eval_steps = math.ceil(n_eval / max(setup.global_batch, 1)) / 3
    fit = int(budget_s / max(n_candidates, 1) / step_s - eval_steps)
    return min(wanted, max(MIN_SWEEP_STEPS, fit))


def _reason(rt: dict[str, Any], sweep: list[dict[str, Any]], chosen: float) -> str:
    """One line for the plan table: what each stage said, with its numbers."""
    head = f"range test suggests {rt['suggestion']:.1e} ({rt['rule']}"
    if "min_loss_lr_div10" in rt:
        head += f"; min/10 {rt['min_loss_lr_div10']:.1e}"
    head += f"; {rt['steps']} steps, {rt['stop']})"
    if not sweep:
        return f"{head}; no held-out data for a mini-sweep: using {chosen:.1e}"
    shown = ", ".join(
        f"{c['lr']:.1e}: "
        + (f"{c['eval_loss']:.3f}" if math.isfinite(c["eval_loss"]) else "diverged")
        for c in sweep
    )
    how = f"mini-sweep on held-out loss ({max(c['steps'] for c in sweep)} steps each)"
    if pick(sweep) is None:
        return f"{head}; {how} diverged everywhere {{{shown}}}: using {chosen:.1e}"
    return f"{head}; {how} picked {chosen:.1e} of {{{shown}}}"


def find_learning_rate(
    model: nn.Module,
    train: list[Tokenized],
    eval_: list[Tokenized],
    setup: StepSetup,
    *,
    out_dir: Path,
    range_steps: int = 50,
    range_budget_s: float = 120.0,
    sweep_steps: int = 24,
    sweep_budget_s: float = 300.0,
    max_eval: int = 64,
    log: Log | None = None,
) -> LRFindResult:
    """Range test, then mini-sweep; writes ``lr_find.png`` and ``lr_find.json`` in ``out_dir``.

    The model comes back exactly as it was. ``chosen`` is the sweep's best; without held-out
    data it is the range test's suggestion clipped to sane bounds, and if every candidate
    diverged it is the smallest candidate / 3.
    """
    say = log or (lambda _msg: None)
    say(f"lr-find: range test, up to {range_steps} steps (budget {range_budget_s:.0f}s)")
    rt = lr_range_test(model, train, setup, steps=range_steps, time_budget_s=range_budget_s)
    if not math.isfinite(rt["suggestion"]):
        raise RunError(f"the LR range test produced no usable point (stopped: {rt['stop']})")
    say(f"lr-find: range test suggests {rt['suggestion']:.1e} ({rt['rule']}, {rt['stop']})")
    candidates = sweep_candidates(
        rt["suggestion"], setup.method, setup.default_lr, ceiling=rt["min_loss_lr"]
    )
    held_out = eval_[:max_eval]
    sweep: list[dict[str, Any]] = []
    chosen = _clip(rt["suggestion"], setup.method, rt["min_loss_lr"])
    if held_out:
        steps = _sweep_steps(
            sweep_steps,
            sweep_budget_s,
            rt["seconds_per_step"],
            len(candidates),
            len(held_out),
            setup,
        )
        say(f"lr-find: mini-sweep of {len(candidates)} LRs x {steps} steps")
        sweep = mini_sweep(
            model, train, held_out, setup, candidates=candidates, steps=steps, log=log
        )
        best = pick(sweep)
        chosen = best["lr"] if best else _sig2(min(candidates) / 3)
    for c in sweep:
        c["chosen"] = c["lr"] == chosen
        c["default"] = c["lr"] == setup.default_lr
    reason = _reason(rt, sweep, chosen)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = write_plot(rt, sweep, chosen, out_dir / "lr_find.png")
    record = {
        "method": setup.method,
        "suggestion": rt["suggestion"],
        "chosen": chosen,
        "default_lr": setup.default_lr,
        "reason": reason,
        "range_test": rt,
        "sweep": sweep,
    }
    (out_dir / "lr_find.json").write_text(json.dumps(_jsonable(record), indent=1) + "\n")
    return LRFindResult(rt["suggestion"], chosen, rt, sweep, plot, reason)


def _jsonable(value: Any) -> Any:
    """NaN/inf become null: strict JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# -- the picture ---------------------------------------------------------------------------


def write_plot(
    rt: dict[str, Any], sweep: list[dict[str, Any]], chosen: float | None, path: Path
) -> Path:
    """Loss against LR (log x): raw and smoothed range-test loss, the suggestion, and the
    sweep's held-out losses with the chosen one marked. matplotlib's object API (Agg), as in
    ``tunepilot.plots``: no global state, no GUI backend."""
    from matplotlib.figure import Figure

    from tunepilot.plots import DPI, EVAL, MUTED, TRAIN

    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.set_xscale("log")
    ax.grid(True, color="#e2e8f0", linewidth=0.8)
    ax.set_axisbelow(True)
    lrs, raw, smooth = rt["lrs"], rt["losses"], rt["smoothed"]
    ax.plot(lrs, raw, color=MUTED, linewidth=0.8, marker="o", markersize=2, alpha=0.6)
    ax.plot(lrs, smooth, color=TRAIN, linewidth=1.8, label="range test, smoothed")
    if math.isfinite(rt["suggestion"]):
        label = f"range test suggests {rt['suggestion']:.1e}"
        ax.axvline(rt["suggestion"], color=TRAIN, linestyle="--", linewidth=1, label=label)
    shown = [c for c in sweep if math.isfinite(c["eval_loss"])]
    if shown:
        ax.plot(
            [c["lr"] for c in shown],
            [c["eval_loss"] for c in shown],
            color=EVAL,
            linestyle="none",
            marker="s",
            markersize=5,
            label="mini-sweep, held-out loss",
        )
    if chosen is not None:
        ax.axvline(chosen, color=EVAL, linewidth=1.2, label=f"chosen {chosen:.1e}")
    values = [v for v in smooth + [c["eval_loss"] for c in shown] if math.isfinite(v)]
    if values:
        # the losses of a diverging tail would squash the interesting part into the bottom row
        top, bottom = max(values), min(values)
        if smooth and math.isfinite(smooth[0]):
            top = min(top, 2 * smooth[0])
        pad = 0.1 * (top - bottom) or 0.1 * abs(top) or 0.1
        ax.set_ylim(bottom - pad, top + 2 * pad)
    ax.set_xlabel("learning rate", fontsize=9)
    ax.set_ylabel("loss per supervised token", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=8, frameon=False, loc="lower left")
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    return path
