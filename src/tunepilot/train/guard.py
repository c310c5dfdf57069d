"""The guardian: judge every optimizer step before it is applied, and repair what goes wrong.

Detection happens after backward and before ``optimizer.step``, so most bad steps are simply not
applied. Repairs escalate, each one logged to ``events.jsonl`` and shown in the progress line:

1. skip the batch (non-finite loss or gradients, a loss spike, an exploding gradient norm);
2. roll back to the last good state (in memory for LoRA, from disk for full fine-tunes) and
   replay without the bad batch, with the learning rate halved;
3. switch precision fp16 -> bf16 (if the hardware has it) -> fp32, also for fp16 scaler storms
   and a loss stuck at exactly 0.0;
4. out of memory: halve the micro-batch, double accumulation (the global batch is unchanged)
   and redo the same step;
5. give up with a diagnosis (exit 3) once the retry budget is spent; checkpoints stay intact.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunepilot.errors import RunError

WINDOW = 50  # recent good steps that define "normal" loss and gradient norm
MIN_HISTORY = 10  # no spike judgement before this many good steps
SPIKE_Z = 8.0  # robust z-score (median / MAD) above which a loss is a spike
GRAD_EXPLOSION = 20.0  # a gradient norm this many times the median is an explosion
ZERO_LOSS_STEPS = 3  # consecutive exact 0.0 losses with targets present
SCALER_STORM = 5  # consecutive fp16 scaler skips
MAX_REPAIRS = 12  # rollbacks, precision switches and OOM halvings in one run
MAX_SKIPS = 50


@dataclass
class Verdict:
    action: str  # "ok" | "skip" | "rollback" | "precision" | "stop"
    kind: str = ""  # what was detected
    message: str = ""


@dataclass
class Guardian:
    events_path: Path | None  # None: judge but write nothing (ranks other than 0)
    losses: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    grad_norms: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    bad_streak: int = 0  # consecutive non-finite steps
    zero_streak: int = 0
    scaler_streak: int = 0
    rollbacks: int = 0
    repairs: int = 0
    skips: int = 0
    history: list[str] = field(default_factory=list)  # what was tried, for the diagnosis
    last_event: str = ""

    # -- state that survives checkpoints -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "losses": list(self.losses),
            "grad_norms": list(self.grad_norms),
            "rollbacks": self.rollbacks,
            "repairs": self.repairs,
            "skips": self.skips,
            "history": self.history[-20:],
        }

    def load(self, state: dict[str, Any]) -> None:
        self.losses.extend(state.get("losses", []))
        self.grad_norms.extend(state.get("grad_norms", []))
        self.rollbacks = state.get("rollbacks", 0)
        self.repairs = state.get("repairs", 0)
        self.skips = state.get("skips", 0)
        self.history = list(state.get("history", []))

    # -- judging --------------------------------------------------------------------------
    def judge(
        self, loss: float, grad_norm: float, supervised: int, precision: str, scaler_active: bool
    ) -> Verdict:
        """Decide what to do with a step whose gradients are computed but not yet applied."""
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if supervised == 0:
            return Verdict("skip", "empty batch", "no token in this batch carries loss")
        if not finite and scaler_active and math.isfinite(loss):
            # fp16 overflow in the gradients: GradScaler skips the step and lowers its scale;
            # a few in a row are normal, a storm means fp16 cannot represent this run
            self.scaler_streak += 1
            if self.scaler_streak >= SCALER_STORM:
                return Verdict(
                    "precision",
                    "fp16 overflow storm",
                    f"{self.scaler_streak} consecutive fp16 gradient overflows",
                )
            return Verdict("ok", "scaler skip", "fp16 gradient overflow; loss scale lowered")
        self.scaler_streak = 0
        if not finite:
            self.bad_streak += 1
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            if self.bad_streak == 1:
                return Verdict(
                    "skip", "non-finite", f"{what} is {loss if what == 'loss' else grad_norm}"
                )
            if precision != "fp32" and self.rollbacks >= 1:
                return Verdict(
                    "precision",
                    "non-finite",
                    f"{what} non-finite again after a rollback in {precision}",
                )
            return Verdict(
                "rollback", "non-finite", f"{what} non-finite {self.bad_streak} steps in a row"
            )
        self.bad_streak = 0
        if loss == 0.0:
            self.zero_streak += 1
            if self.zero_streak >= ZERO_LOSS_STEPS:
                if precision != "fp32":
                    return Verdict(
                        "precision",
                        "zero loss",
                        f"loss exactly 0.0 for "
                        f"{self.zero_streak} steps with targets present: underflow",
                    )
                return Verdict(
                    "stop",
                    "zero loss",
                    f"loss exactly 0.0 for {self.zero_streak} "
                    "steps in fp32 with targets present: the targets are probably "
                    "visible in the inputs (check the data and label masks)",
                )
            return Verdict("ok")
        self.zero_streak = 0
        spike = self._spike(loss, grad_norm)
        if spike:
            return Verdict("skip", "spike", spike)
        return Verdict("ok")

    def _spike(self, loss: float, grad_norm: float) -> str:
        if len(self.losses) < MIN_HISTORY:
            return ""
        median = statistics.median(self.losses)
        mad = statistics.median(abs(x - median) for x in self.losses) or 1e-8
        z = (loss - median) / (1.4826 * mad)
        if z > SPIKE_Z and loss > 1.5 * median:
            return f"loss {loss:.4g} is {z:.0f} robust sd above the recent median {median:.4g}"
        norm_median = statistics.median(self.grad_norms)
        if norm_median > 0 and grad_norm > GRAD_EXPLOSION * norm_median:
            return (
                f"gradient norm {grad_norm:.4g} is {grad_norm / norm_median:.0f}x the "
                f"recent median {norm_median:.4g}"
            )
        return ""

    def accepted(self, loss: float, grad_norm: float) -> None:
        """A step was applied: it becomes part of what "normal" means."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.losses.append(loss)
            self.grad_norms.append(grad_norm)

    # -- bookkeeping ----------------------------------------------------------------------
    def record(self, step: int, position: int, verdict: Verdict, action: str) -> None:
        """Log a repair to events.jsonl; enforce the retry budget."""
        if verdict.action == "skip":
            self.skips += 1
        elif verdict.action != "ok":
            self.repairs += 1
        self.history.append(f"step {step}: {verdict.kind} -> {action}")
        self.last_event = f"{verdict.kind}: {action}"
        with open(self.events_path or os.devnull, "a", encoding="utf-8") as f:
            f.write(
                json.dumps(
                    {
                        "step": step,
                        "position": position,
                        "kind": verdict.kind,
                        "action": action,
                        "message": verdict.message,
                        "time": round(time.time(), 3),
                    }
                )
                + "\n"
            )
        if self.repairs > MAX_REPAIRS or self.skips > MAX_SKIPS:
            self.give_up(
                step,
                f"more than {MAX_REPAIRS} repairs / {MAX_SKIPS} skipped batches",
                data=verdict.kind == "empty batch",
            )

    def give_up(self, step: int, why: str, data: bool = False) -> None:
        """``data``: the last straw was a batch with no target, which no learning rate or
        precision explains: the advice points at the data and max_length instead."""
        tried = "; ".join(self.history[-6:]) or "nothing"
        advice = (
            "Batches with no token carrying loss come from examples whose targets are "
            "missing or cut off: check the data (tunepilot plan --show-sample N shows what "
            "is trained) and train.max_length"
            if data
            else "Consider a lower train.learning_rate, train.precision: fp32, or checking "
            "the data near this step"
        )
        raise RunError(
            f"training stopped at step {step}: {why}. Tried: {tried}. The last good "
            f"checkpoint is intact. {advice} (events.jsonl has every event)"
        )


def next_precision(current: str, bf16_available: bool) -> str | None:
    """The escalation ladder: fp16 -> bf16 (when native) -> fp32."""
    if current == "fp16":
        return "bf16" if bf16_available else "fp32"
    if current == "bf16":
        return "fp32"
    return None
