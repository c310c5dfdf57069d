"""The training loop. Read it top to bottom: the plan decided everything, the loop obeys.

Per optimizer step: collate the step's micro-batches, forward + backward each (loss normalised by
the step's supervised tokens), clip, step, schedule; then log, maybe evaluate, maybe save.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tunepilot.data.batching import collate, optimizer_steps
from tunepilot.data.tokenize import Tokenized
from tunepilot.evaluate import eval_loss
from tunepilot.hardware import peak_rss_gb
from tunepilot.plan.plan import Plan
from tunepilot.train.checkpoint import save_checkpoint
from tunepilot.train.checks import GradientAudit
from tunepilot.train.optim import build_optimizer, build_scheduler
from tunepilot.train.progress import Reporter
from tunepilot.train.step import accumulate, update


@dataclass
class LoopInputs:
    model: nn.Module
    plan: Plan
    train: list[Tokenized]
    eval: list[Tokenized]
    pad_id: int
    device: str
    seed: int
    run_dir: Path
    reporter: Reporter


@dataclass
class LoopResult:
    steps: int
    final_loss: float
    eval_losses: dict[int, float]
    seconds: float
    real_tokens: int
    supervised_tokens: int


def memory_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return peak_rss_gb()


def train_loop(run: LoopInputs) -> LoopResult:
    plan, model, device = run.plan, run.model, run.device
    total, max_len = plan["total_steps"], plan["max_length"]
    precision, eval_every, save_every = plan["precision"], plan["eval_every"], plan["save_every"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, plan["learning_rate"], plan["weight_decay"], device)
    scheduler = build_scheduler(optimizer, plan["scheduler"], plan["warmup_steps"], total)
    # fp16 needs loss scaling to keep small gradients from flushing to zero; bf16 does not
    scaler = torch.amp.GradScaler(device) if precision == "fp16" else None
    audit = GradientAudit.start(model)  # catches adapters that silently never train
    batches = optimizer_steps(
        len(run.train), plan["global_batch_size"], plan["micro_batch_size"], run.seed
    )
    eval_losses: dict[int, float] = {}
    real_total = supervised_total = 0
    loss = float("nan")
    model.train()
    start = time.perf_counter()
    run.reporter.start()
    for step in range(1, total + 1):
        epoch, groups = next(batches)
        micro_batches = [collate([run.train[i] for i in g], max_len, run.pad_id) for g in groups]
        tick = time.perf_counter()
        loss, supervised = accumulate(model, micro_batches, precision, device, scaler)
        lr = scheduler.get_last_lr()[0]
        audit.after_backward(model, step, lr)
        grad_norm = update(params, optimizer, scheduler, scaler, plan["max_grad_norm"])
        audit.after_update(model, step, total)
        seconds = time.perf_counter() - tick
        real = sum(b.real_tokens for b in micro_batches)
        padded = sum(b.padded_tokens for b in micro_batches)
        real_total += real
        supervised_total += supervised
        run.reporter.log(
            {
                "step": step,
                "epoch": epoch,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": real / seconds,
                "supervised_tokens": supervised,
                "real_tokens": real,
                "padding_fraction": 1 - real / padded,
                "memory_gb": round(memory_gb(device), 3),
                "elapsed_s": round(time.perf_counter() - start, 3),
            }
        )
        if eval_every and step % eval_every == 0 and step < total:
            eval_losses[step] = _evaluate(run, step)
        if save_every and step % save_every == 0:
            save_checkpoint(model, run.run_dir, step)
    run.reporter.stop()
    return LoopResult(
        total, loss, eval_losses, time.perf_counter() - start, real_total, supervised_total
    )


def _evaluate(run: LoopInputs, step: int) -> float:
    value = eval_loss(
        run.model,
        run.eval,
        run.plan["max_length"],
        run.pad_id,
        run.plan["micro_batch_size"],
        run.plan["precision"],
        run.device,
    )
    run.reporter.log({"step": step, "eval_loss": value})
    return value
