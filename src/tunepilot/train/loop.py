"""The training loop. Read it top to bottom: the plan decided everything, the loop obeys, and
the guardian judges each step before it is applied.

Per optimizer step: take the global batch at the current data position, forward + backward its
micro-batches (loss normalised by the step's supervised tokens), clip, let the guardian judge,
then apply or repair; log, maybe evaluate, maybe checkpoint; stop cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tunepilot import distributed
from tunepilot.config import DebugSettings
from tunepilot.data.batching import global_batch_at
from tunepilot.data.batching import micro_batches as make_micro_batches
from tunepilot.data.tokenize import Tokenized
from tunepilot.errors import Interrupted, RunError
from tunepilot.evaluate import eval_loss
from tunepilot.hardware import out_of_memory, peak_rss_gb, reset_peak_memory
from tunepilot.plan.plan import Plan
from tunepilot.train import checkpoint as ckpt
from tunepilot.train.checks import GradientAudit
from tunepilot.train.faults import Faults
from tunepilot.train.guard import Guardian, Verdict, next_precision
from tunepilot.train.optim import build_optimizer, build_scheduler
from tunepilot.train.progress import Reporter
from tunepilot.train.signals import EXIT_CODES, graceful_stop
from tunepilot.train.step import accumulate, apply, clip, make_scaler, rescale_lr

SNAPSHOT_EVERY = 10  # good steps between in-memory snapshots (LoRA rollback points)


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
    bf16_available: bool = False
    in_memory_rollback: bool = True  # LoRA: cheap; full fine-tunes roll back from disk
    keep_checkpoints: int = 2
    resume_from: Path | None = None
    debug: DebugSettings | None = None
    # called with (step, eval loss) after each periodic evaluation; a sweep's pruner raises from
    # here to stop a hopeless trial (the exception propagates; nothing is checkpointed)
    on_eval: Callable[[int, float], None] | None = None
    replica: distributed.Replica | None = None  # DDP/FSDP wrapper of a distributed run


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
    total, max_len, base_lr = plan["total_steps"], plan["max_length"], plan["learning_rate"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, base_lr, plan["weight_decay"], device)
    scheduler = build_scheduler(optimizer, plan["scheduler"], plan["warmup_steps"], total)
    progress = ckpt.Progress(micro_batch_size=plan["micro_batch_size"], precision=plan["precision"])
    guardian = Guardian(run.run_dir / "events.jsonl" if distributed.is_main() else None)
    faults = Faults(run.debug or DebugSettings(), run.run_dir)
    scaler = make_scaler(progress.precision, device)
    if run.resume_from is not None:
        saved = ckpt.load_shared(run.resume_from, model)
        scaler = make_scaler(saved.progress.precision, device)
        progress = ckpt.restore(saved, model, optimizer, scheduler, scaler)
        guardian.load(progress.guardian)
        # a micro-batch lowered in config.yaml after an out-of-memory stop applies on resume
        progress.micro_batch_size = min(progress.micro_batch_size, plan["micro_batch_size"])
    # catches adapters that silently never train (only meaningful from the first step)
    audit = GradientAudit.start(model) if progress.step == 0 else None
    # rollback point: in memory for LoRA (cheap); full fine-tunes reload the last checkpoint
    last_good = (
        ckpt.capture(model, optimizer, scheduler, scaler, progress)
        if run.in_memory_rollback
        else None
    )
    eval_losses: dict[int, float] = {}
    real_total = supervised_total = 0
    loss = float("nan")
    model.train()
    # the logged memory is training's own peak, comparable with the plan's prediction; the
    # probe's worst-case trials ran in this process just before
    reset_peak_memory(device)
    start = time.perf_counter()
    run.reporter.start(progress.step)
    with graceful_stop() as stop:
        while progress.step < total:
            step = progress.step + 1
            faults.before_step(step)
            if progress.position in progress.skipped_positions:  # replay without a bad batch
                progress.position += 1
                continue
            epoch, indices = global_batch_at(
                progress.position, len(run.train), plan["global_batch_size"], run.seed
            )
            mine = distributed.shard(indices)  # this rank's slice; all of it when alone
            tick = time.perf_counter()
            try:
                faults.check_oom(progress.micro_batch_size, device)
                micro_batches = make_micro_batches(
                    [run.train[i] for i in mine],
                    progress.micro_batch_size,
                    max_len,
                    run.pad_id,
                    plan["packing"],
                )
                # as many passes as every other rank, or their collectives never pair up (packed
                # rows make the count depend on the slice's lengths, so the ranks agree on it)
                micro_batches = distributed.even_out(
                    micro_batches,
                    distributed.agree_max(len(micro_batches)),
                    lambda first=indices[0]: make_micro_batches(
                        [run.train[first]], 1, max_len, run.pad_id, plan["packing"]
                    )[0],
                )
                # the loss is normalised by the supervised tokens of all ranks' slices
                (tokens,) = distributed.sum_over_ranks(
                    [sum(b.supervised_tokens for b in micro_batches)]
                )
                loss, supervised = accumulate(
                    model,
                    micro_batches,
                    progress.precision,
                    device,
                    scaler,
                    normaliser=tokens,
                    replica=run.replica,
                )
                loss, real, padded = distributed.sum_over_ranks(
                    [
                        loss,
                        sum(b.real_tokens for b in micro_batches),
                        sum(b.padded_tokens for b in micro_batches),
                    ]
                )
            except RuntimeError as exc:  # torch.OutOfMemoryError is one
                if not out_of_memory(exc):
                    raise
                _recover_from_oom(progress, guardian, optimizer, step, len(indices))
                continue  # the same step again, smaller micro-batches, same examples
            loss = faults.after_backward(model, progress.position, progress.precision, loss)
            lr = scheduler.get_last_lr()[0]
            if audit:
                audit.after_backward(model, step, lr)
            grad_norm = clip(params, optimizer, scaler, plan["max_grad_norm"])
            verdict = guardian.judge(
                loss, grad_norm, supervised, progress.precision, scaler is not None
            )
            if verdict.action != "ok":
                optimizer.zero_grad(set_to_none=True)
                scaler, last_good = _repair(
                    verdict,
                    run,
                    progress,
                    guardian,
                    last_good,
                    (model, optimizer, scheduler),
                    scaler,
                    base_lr,
                )
                continue
            apply(optimizer, scheduler, scaler)
            if verdict.kind:  # an fp16 overflow the scaler absorbed
                guardian.record(step, progress.position, verdict, "loss scale lowered")
            else:
                guardian.accepted(loss, grad_norm)
            if audit:
                audit.after_update(model, step, total)
                audit = None if audit.done else audit
            progress.step, progress.position = step, progress.position + 1
            real_total += real
            supervised_total += supervised
            seconds = time.perf_counter() - tick
            record = {
                "step": step,
                "epoch": epoch,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": real / seconds,
                "supervised_tokens": supervised,
                "real_tokens": real,
                "padding_fraction": 1 - real / padded,
                "micro_batch_size": progress.micro_batch_size,
                "precision": progress.precision,
                "memory_gb": round(memory_gb(device), 3),
                "elapsed_s": round(time.perf_counter() - start, 3),
            }
            if run.debug and run.debug.log_example_ids:
                record["example_ids"] = indices
            run.reporter.log(record, event=guardian.last_event)
            guardian.last_event = ""
            if step % SNAPSHOT_EVERY == 0 and run.in_memory_rollback:
                last_good = ckpt.capture(model, optimizer, scheduler, scaler, progress)
            if plan["eval_every"] and step % plan["eval_every"] == 0 and step < total:
                eval_losses[step] = _evaluate(run, step, progress)
            # a signal may reach only some ranks: all must stop after the same step
            signum = distributed.agree_max(stop.signum or 0)
            must_stop = signum > 0
            if (plan["save_every"] and step % plan["save_every"] == 0) or must_stop:
                progress.guardian = guardian.to_dict()
                snap = ckpt.capture(model, optimizer, scheduler, scaler, progress)
                if distributed.is_main():
                    ckpt.save(snap, run.run_dir, run.keep_checkpoints, faults.during_checkpoint)
                distributed.barrier()
            if must_stop:
                run.reporter.stop()
                code = EXIT_CODES[signum]
                raise Interrupted(
                    f"stopped by signal after step {step}; checkpoint written. "
                    "Run the same command again to resume",
                    code,
                )
    run.reporter.stop()
    return LoopResult(
        progress.step, loss, eval_losses, time.perf_counter() - start, real_total, supervised_total
    )


def _recover_from_oom(
    progress: ckpt.Progress,
    guardian: Guardian,
    optimizer: torch.optim.Optimizer,
    step: int,
    batch_size: int,
) -> None:
    """Halve the micro-batch (accumulation doubles; the global batch stays the same)."""
    old = progress.micro_batch_size
    if distributed.world() > 1:
        # the other ranks are already waiting in this step's gradient all-reduce, so they
        # cannot redo it with this one: stop, and let the resumed run use a smaller batch
        raise RunError(
            f"out of memory on rank {distributed.rank()} at step {step} with micro-batch {old}; "
            "a distributed run cannot shrink its micro-batch mid-step. Set "
            "train.micro_batch_size lower in the run's config.yaml and run the same command "
            "again to resume from the last checkpoint"
        )
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    verdict = Verdict("oom", "out of memory", f"micro-batch {old} did not fit")
    if old == 1:
        guardian.give_up(
            step,
            "out of memory with a micro-batch of 1: lower train.max_length, "
            "enable train.gradient_checkpointing or use method: lora",
        )
    progress.micro_batch_size = max(1, old // 2)
    accumulation = -(-batch_size // progress.micro_batch_size)
    guardian.record(
        step,
        progress.position,
        verdict,
        f"micro-batch {old} -> {progress.micro_batch_size}, accumulation {accumulation}, same step",
    )


def _repair(
    verdict: Verdict,
    run: LoopInputs,
    progress: ckpt.Progress,
    guardian: Guardian,
    last_good: ckpt.Snapshot | None,
    parts: tuple,
    scaler: torch.amp.GradScaler | None,
    base_lr: float,
) -> tuple[torch.amp.GradScaler | None, ckpt.Snapshot | None]:
    """Carry out a non-ok verdict; returns the (possibly new) scaler and rollback point."""
    model, optimizer, scheduler = parts
    step = progress.step + 1
    if verdict.action == "stop":
        guardian.give_up(step, verdict.message)
    if verdict.action == "skip":
        guardian.record(step, progress.position, verdict, "batch skipped")
        progress.skipped_positions.append(progress.position)
        progress.position += 1
        return scaler, last_good
    bad_position = progress.position
    switch = verdict.action == "precision"
    new_precision = next_precision(progress.precision, run.bf16_available) if switch else None
    if switch and new_precision is None:
        guardian.give_up(step, verdict.message)
    # roll back to the last good state and replay without the offending batch
    point = last_good
    if point is None:
        path = distributed.from_main(lambda: ckpt.latest_valid(run.run_dir))
        point = ckpt.load_shared(path, model)
    if point is not None:
        back = ckpt.restore(point, model, optimizer, scheduler, scaler)
        progress.step, progress.position = back.step, back.position
        action = f"rolled back to step {progress.step}"
    else:
        progress.position += 1  # nothing to roll back to yet: at least drop the batch
        action = "no rollback point yet, batch skipped"
    if not switch:  # after a precision switch the batch itself is presumed innocent
        progress.skipped_positions = sorted({*progress.skipped_positions, bad_position})
    if switch:
        progress.precision = new_precision
        scaler = make_scaler(new_precision, run.device)
        action += f", precision -> {new_precision}"
    else:
        guardian.rollbacks += 1
        progress.lr_scale *= 0.5
        action += f", learning rate x{progress.lr_scale:g}"
    rescale_lr(optimizer, scheduler, base_lr, progress.lr_scale)
    guardian.bad_streak = 0
    guardian.record(step, bad_position, verdict, action)
    if not run.in_memory_rollback:
        return scaler, None
    return scaler, ckpt.capture(model, optimizer, scheduler, scaler, progress)


def _evaluate(run: LoopInputs, step: int, progress: ckpt.Progress) -> float:
    value = eval_loss(
        run.model,
        run.eval,
        run.plan.data["eval_max_length"],
        run.pad_id,
        progress.micro_batch_size,
        progress.precision,
        run.device,
        max_tokens=progress.micro_batch_size * run.plan["max_length"],
    )
    run.reporter.log({"step": step, "eval_loss": value})
    if run.on_eval is not None:
        run.on_eval(step, value)
    return value
