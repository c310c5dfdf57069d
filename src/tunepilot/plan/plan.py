"""Assemble every decision into a Plan: what ``tunepilot plan`` prints and ``train`` obeys.

Order matters and mirrors the dependencies: precision and length first (they size memory), then
the batch that fits, then steps from the batch, then the schedule from the steps.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from tunepilot.config import Config
from tunepilot.data.tokenize import Tokenized, seen_in_training
from tunepilot.hardware import Hardware
from tunepilot.plan import (
    batch,
    compilation,
    length,
    lr,
    memory,
    optimizer,
    padding,
    precision,
    schedule,
    steps,
)
from tunepilot.plan.decision import AUTO_SOURCE, Decision, given, user
from tunepilot.plan.probe import ProbeTooSlow

KNOB_ORDER = (
    "micro_batch_size",
    "gradient_accumulation_steps",
    "global_batch_size",
    "max_length",
    "num_epochs",
    "max_steps",
    "total_steps",
    "learning_rate",
    "scheduler",
    "warmup_steps",
    "weight_decay",
    "optimizer",
    "max_grad_norm",
    "precision",
    "gradient_checkpointing",
    "packing",
    "compile",
    "padding_side",
    "pad_token",
    "eval_every",
    "save_every",
)


@dataclass
class Plan:
    knobs: dict[str, Decision]
    data: dict[str, Any]
    hardware: Hardware
    model: dict[str, Any]
    memory: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    probe: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.knobs[name].value

    def to_dict(self) -> dict[str, Any]:
        return {
            "knobs": {k: self.knobs[k].to_dict() for k in KNOB_ORDER if k in self.knobs},
            "data": self.data,
            "hardware": self.hardware.to_dict(),
            "model": self.model,
            "memory_estimate_gb": self.memory,
            "warnings": self.warnings,
            "probe": self.probe,
        }


def build_plan(
    cfg: Config,
    hw: Hardware,
    shape: memory.ModelShape,
    pad: Decision,
    train: list[Tokenized],
    eval_: list[Tokenized],
    data_info: dict[str, Any],
    model_info: dict[str, Any],
    measure: batch.Measure | None = None,
    packing: Decision | None = None,
) -> Plan:
    """All decisions. With ``measure`` (a probe running real steps on the model), precision on
    CPU, the micro-batch and checkpointing are measured; without it, the memory model decides."""
    t = cfg.train
    processes = hw.processes  # each takes 1/processes of every global batch
    warnings: list[str] = []
    knobs: dict[str, Decision] = {}
    knobs["precision"], more = precision.decide_precision(t.precision, hw)
    warnings += more
    knobs["max_length"] = length.decide_max_length(t.max_length, train, shape.context)
    max_len = knobs["max_length"].value
    # before the probe: eval targets beyond the context can never be scored (the check at the
    # evaluations' own length, below, needs the micro-batch)
    length.require_targets(eval_, shape.context, shape.context, "eval", "")
    budget = (
        t.memory_budget_gb
        if given(t.memory_budget_gb)
        else memory.budget_gb(hw.memory_available_gb)
    )
    n_train = len(train)
    ckpt_setting = t.gradient_checkpointing if given(t.gradient_checkpointing) else False
    knobs["num_epochs"] = steps.decide_epochs(t.num_epochs, n_train)
    governed_by_steps = given(t.max_steps) and t.max_steps > 0
    epochs = None if governed_by_steps else knobs["num_epochs"].value
    prec = knobs["precision"].value
    if given(t.gradient_accumulation_steps) and not given(t.global_batch_size):
        # the user fixed accumulation: the micro-batch that fits decides the global batch
        micro = _micro_batch(cfg, hw, shape, max_len, prec, ckpt_setting, budget, n_train)
        knobs["micro_batch_size"] = micro
        acc = t.gradient_accumulation_steps
        across = f" x {processes} processes" if processes > 1 else ""
        knobs["global_batch_size"] = Decision(
            micro.value * acc * processes,
            AUTO_SOURCE,
            f"micro-batch {micro.value} x accumulation {acc}{across}",
        )
    else:
        knobs["global_batch_size"] = batch.decide_global_batch(
            t.global_batch_size, n_train, epochs, processes
        )
    per_process = knobs["global_batch_size"].value // processes
    probe: dict[str, Any] = {}
    measured = False
    if measure is not None and not given(t.gradient_accumulation_steps):
        started = time.monotonic()
        try:
            prec_d, micro_d, ckpt_d, points = batch.decide_by_probe(
                t,
                hw,
                knobs["precision"],
                per_process,
                n_train,
                max_len,
                measure,
                started + t.probe_seconds,
            )
        except ProbeTooSlow as slow:  # decided below, as without a probe
            warnings.append(slow.reason)
        else:
            measured = True
            knobs["precision"], knobs["micro_batch_size"] = prec_d, micro_d
            knobs["gradient_checkpointing"] = ckpt_d
            prec = prec_d.value
            probe = _probe_summary(
                points,
                shape,
                max_len,
                micro_d.value,
                prec,
                ckpt_d.value,
                per_process,
                time.monotonic() - started,
            )
    if "micro_batch_size" not in knobs:  # no probe, or its first trial was too slow
        knobs["micro_batch_size"] = _micro_batch(
            cfg, hw, shape, max_len, prec, ckpt_setting, budget, n_train, per_process
        )
    if not measured:
        knobs["gradient_checkpointing"] = memory.decide_gradient_checkpointing(
            t.gradient_checkpointing, shape, knobs["micro_batch_size"].value, max_len, prec, budget
        )
    micro = knobs["micro_batch_size"].value
    if knobs["global_batch_size"].value > n_train:
        warnings.append(
            f"global batch {knobs['global_batch_size'].value} > {n_train} training "
            "examples: every step sees the whole dataset"
        )
    knobs["gradient_accumulation_steps"] = batch.decide_accumulation(
        t.gradient_accumulation_steps, knobs["global_batch_size"].value, micro, processes
    )
    knobs["max_steps"], knobs["total_steps"], more = steps.decide_steps(
        knobs["num_epochs"], t.max_steps, n_train, knobs["global_batch_size"].value
    )
    warnings += more
    total = knobs["total_steps"].value
    global_batch = knobs["global_batch_size"].value
    knobs["learning_rate"] = lr.decide_learning_rate(
        t.learning_rate, cfg.method, shape.total_params, global_batch, shape.hidden_size
    )
    if knobs["learning_rate"].source == "user":
        rule = lr.decide_learning_rate(
            "auto", cfg.method, shape.total_params, global_batch, shape.hidden_size
        )
        warnings += lr.check_rate(knobs["learning_rate"].value, rule.value, cfg.method)
    knobs["scheduler"] = schedule.decide_scheduler(t.scheduler)
    knobs["warmup_steps"], more = schedule.decide_warmup(t.warmup_steps, t.warmup_ratio, total)
    warnings += more
    knobs["weight_decay"] = optimizer.decide_weight_decay(t.weight_decay, cfg.method)
    knobs["optimizer"] = optimizer.decide_optimizer(t.optimizer, hw.device)
    knobs["max_grad_norm"] = optimizer.decide_max_grad_norm(t.max_grad_norm)
    knobs["packing"] = packing or Decision(False, AUTO_SOURCE, "padded micro-batches")
    knobs["padding_side"] = padding.decide_padding_side()
    knobs["pad_token"] = pad
    step_s = probe.get("step_seconds")
    knobs["compile"] = compilation.decide_compile(
        t.compile,
        hw.device,
        processes,
        total * step_s if step_s else None,
        knobs["precision"].value,
        cfg.method,
        hw.fp32_matmul,
    )
    # Training's evaluations score eval examples up to a training micro-batch's tokens (at most
    # the context), not cut to max_length: an auto length chosen from short training examples
    # cut 35 of the demo's 120 eval examples to nothing (until session 23). The cap keeps a lone
    # long example's forward (no gradients, no activations kept) well inside what a training
    # step of as many tokens holds; `tunepilot eval`, which runs nothing else, cuts at the
    # context only. Planned once, so the length stays the same all run even when an
    # out-of-memory repair halves the micro-batch.
    eval_cut = min(shape.context, max(max_len, knobs["micro_batch_size"].value * max_len))
    length.require_targets(eval_, eval_cut, shape.context, "eval", length.EVAL_REMEDY)
    eval_tokens = sum(min(len(ex.input_ids), eval_cut) for ex in eval_)
    knobs["eval_every"] = _eval_every(
        t.eval_every, total, step_s, _eval_seconds(eval_tokens, probe, cfg.method)
    )
    knobs["save_every"] = _save_every(t.save_every, total, cfg.method)
    est = memory.estimate(
        shape, micro, max_len, knobs["precision"].value, knobs["gradient_checkpointing"].value
    )
    trunc = length.truncation(train, max_len)
    eval_trunc = length.truncation(eval_, eval_cut)
    data = data_info | {
        "train_examples": n_train,
        "eval_examples": len(eval_),
        "eval_max_length": eval_cut,
        "supervised_tokens": sum(ex.supervised for ex in train) - trunc.supervised_tokens,
        "train_tokens": sum(len(ex.input_ids) for ex in train) - trunc.tokens,
        "truncated_examples": trunc.examples,
        "truncated_tokens": trunc.tokens,
        "truncated_supervised_tokens": trunc.supervised_tokens,
        "dropped_examples": trunc.emptied,
        "length_percentiles": length.percentiles([len(ex.input_ids) for ex in train]),
    }
    if trunc.examples:
        warnings.append(
            f"{trunc.examples} training examples exceed max_length {max_len}: "
            f"{trunc.tokens} tokens cut, {trunc.supervised_tokens} of them trained on"
            + (
                f"; {trunc.emptied} examples lose all targets and are skipped"
                if trunc.emptied
                else ""
            )
        )
    if eval_trunc.examples:
        warnings.append(
            f"{eval_trunc.examples} eval examples are longer than evaluations score "
            f"({eval_cut} tokens: micro_batch_size x max_length, at most the model's context): "
            f"the eval loss leaves out {eval_trunc.supervised_tokens} of their targets"
            + (f" ({eval_trunc.emptied} examples count for nothing)" if eval_trunc.emptied else "")
        )
    if copies := seen_in_training(train, eval_):
        shown = ", ".join(f"{e} = {t}" for e, t in copies[:3])
        warnings.append(
            f"{len(copies)} of {len(eval_)} eval examples are also training examples, word for "
            f"word ({shown}{', ...' if len(copies) > 3 else ''}): their eval loss and exact "
            "match will read better than on unseen data; remove the duplicates or hold out "
            "others"
        )
    return Plan(
        knobs,
        data,
        hw,
        model_info,
        est.to_dict() | {"budget_gb": round(budget, 2)},
        warnings,
        probe,
    )


def _micro_batch(
    cfg: Config,
    hw: Hardware,
    shape: memory.ModelShape,
    max_len: int,
    prec: str,
    ckpt: bool,
    budget: float,
    n_train: int,
    global_batch: int | None = None,
) -> Decision:
    t = cfg.train
    if not given(t.micro_batch_size) and given(t.gradient_accumulation_steps) and global_batch:
        value = global_batch // t.gradient_accumulation_steps
        return Decision(
            value,
            AUTO_SOURCE,
            f"global batch {global_batch} / accumulation {t.gradient_accumulation_steps}",
        )
    return batch.decide_micro_batch(
        t.micro_batch_size, hw, shape, max_len, prec, ckpt, budget, n_train, global_batch
    )


#: evaluations during training: at most this many, and together at most this share of the
#: predicted training time (the evaluations before and after training always run)
EVALS_DURING = 3
EVAL_SHARE = 0.10
#: training FLOPs per token over a forward pass's: 6N against 2N for a full fine-tune, 4N (no
#: gradients for frozen weights) against 2N for LoRA
TRAIN_OVER_FORWARD = {"full": 3.0, "lora": 2.0}


def _eval_seconds(eval_tokens: int, probe: dict[str, Any], method: str) -> float | None:
    """One evaluation's predicted time: its tokens at the probe's training speed, scaled by
    how much cheaper a forward pass is than a training step. None without a measured speed."""
    speed = probe.get("tokens_per_s")
    if not speed or not eval_tokens:
        return None
    return eval_tokens / (speed * TRAIN_OVER_FORWARD.get(method, 2.0))


def _spacing(total_steps: int, evaluations: int) -> tuple[int, int]:
    """Steps between evaluations for at most ``evaluations`` of them before the last step,
    and how many that makes (the loop evaluates at every multiple below the total; the
    evaluation after training follows)."""
    every = -(-total_steps // (evaluations + 1))
    return every, (total_steps - 1) // every


def _eval_every(
    setting: Any, total_steps: int, step_seconds: float | None, eval_seconds: float | None
) -> Decision:
    if given(setting):
        return user(setting)
    if total_steps < 8:
        return Decision(0, AUTO_SOURCE, "short run: evaluate before and after only")
    if not (step_seconds and eval_seconds):
        every, count = _spacing(total_steps, EVALS_DURING)
        return Decision(
            every, AUTO_SOURCE, f"every {every} steps: {count} evaluations during training"
        )
    training = total_steps * step_seconds
    during = min(EVALS_DURING, int(EVAL_SHARE * training / eval_seconds))
    cost = f"one evaluation takes ~{eval_seconds:.0f} s against ~{training:.0f} s of training"
    if during == 0:
        return Decision(
            0,
            AUTO_SOURCE,
            f"before and after training only: {cost} (more would exceed {EVAL_SHARE:.0%})",
        )
    every, count = _spacing(total_steps, during)
    return Decision(
        every,
        AUTO_SOURCE,
        f"every {every} steps: {count} evaluations during training; {cost}, so "
        f"{count} cost {count * eval_seconds / training:.0%} of it (at most {EVAL_SHARE:.0%})",
    )


def _save_every(setting: Any, total_steps: int, method: str) -> Decision:
    if given(setting):
        return user(setting)
    per_run = 10 if method == "lora" else 4  # full checkpoints hold every weight and moment
    every = max(1, -(-total_steps // per_run))
    return Decision(
        every,
        AUTO_SOURCE,
        f"{'every step' if every == 1 else f'every {every} steps'} "
        f"({total_steps // every} in {total_steps} steps; a {method} run aims at ~{per_run}): "
        "a crash or preemption loses at most that much work; resume with the same command",
    )


def _probe_summary(
    points: list,
    shape: memory.ModelShape,
    max_len: int,
    micro: int,
    prec: str,
    ckpt: bool,
    global_batch: int,
    seconds: float,
) -> dict[str, Any]:
    """The measurements behind the plan, with the memory model's prediction beside the probe's
    measurement (its error is how much to trust the model where nothing was measured)."""
    chosen = next(
        (
            p
            for p in points
            if p.micro_batch == micro and p.precision == prec and p.checkpointing == ckpt and p.fits
        ),
        None,
    )
    predicted = memory.estimate(shape, micro, max_len, prec, ckpt).total_gb
    summary: dict[str, Any] = {
        "seconds": round(seconds, 1),
        "points": [asdict(p) for p in points],
        "predicted_peak_gb": round(predicted, 2),
    }
    if chosen is not None:
        summary["measured_peak_gb"] = chosen.peak_gb
        summary["resting_gb"] = chosen.resting_gb
        # the model counts training state only: compare it with what training added
        added = chosen.peak_gb - chosen.resting_gb
        summary["memory_model_error"] = round((predicted - added) / added, 3)
        summary["tokens_per_s"] = round(chosen.tokens_per_s, 1)
        summary["step_seconds"] = round(global_batch * max_len / chosen.tokens_per_s, 2)
    return summary
