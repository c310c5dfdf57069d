"""One trial: a short tunepilot run with the trial's values, judged on held-out loss.

Every trial starts from the same resolved base config (batch, length, precision, steps, seed and
data pinned by the sweep's plan), so trials differ only in the searched knobs. Its run directory
is ``trials/trial-NNN/`` under the sweep's output dir: a normal run directory (``tunepilot runs``
and ``tunepilot report`` read it) plus ``train.log`` (what ``train`` printed) and ``trial.json``
(the trial's values and outcome).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from rich.console import Console

from tunepilot.config import validate
from tunepilot.errors import Interrupted, RunError
from tunepilot.run import make_run_dir, train
from tunepilot.sweep.outputs import format_params
from tunepilot.sweep.space import apply_params, suggest

# what a finished trial no longer needs: resume state (trials are never resumed: a crashed one
# is replaced) and the merged model (tens of GB for a full fine-tune of a 7B model; the winner is
# retrained from best.yaml). LoRA trials keep their small adapter.
DISCARDED = ("checkpoints", "model")


def trial_dir(out_dir: Path, number: int) -> Path:
    return out_dir / "trials" / f"trial-{number:03d}"


def run_trial(
    trial: optuna.Trial,
    space: dict[str, BaseDistribution],
    base: dict[str, Any],
    out_dir: Path,
    console: Console,
) -> float:
    """Train with the trial's values; returns the final eval loss.

    Each periodic eval loss is reported to the pruner, which may end the trial there
    (``optuna.TrialPruned`` propagates through the loop and ``train``).
    """
    params = suggest(trial, space)
    run_dir = trial_dir(out_dir, trial.number)
    trial.set_user_attr("run_dir", str(run_dir))
    cfg = validate(
        {**apply_params(base, params), "output_dir": str(run_dir)}, f"trial {trial.number}"
    )
    console.print(f"trial {trial.number}: {format_params(params)}", highlight=False)

    def report(step: int, loss: float) -> None:
        trial.report(loss, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"eval loss {loss:.4f} at step {step}")

    make_run_dir(run_dir)
    with open(run_dir / "train.log", "w", encoding="utf-8") as log:
        try:
            train(cfg, Console(file=log, width=120, highlight=False), quiet=True, on_eval=report)
        except RunError as exc:  # e.g. the guardian gave up on a diverging learning rate
            trial.set_user_attr("error", str(exc))
            raise
        except Interrupted:
            trial.set_user_attr("error", "stopped by a signal")
            raise
    result = json.loads((run_dir / "eval.json").read_text())
    trial.report(result["after"]["loss"], result["steps"])  # the curve's last point
    return result["after"]["loss"]


def finish(frozen: optuna.trial.FrozenTrial) -> None:
    """Record the outcome in the trial's directory and drop what it no longer needs."""
    run_dir = Path(frozen.user_attrs.get("run_dir", ""))
    if not run_dir.is_dir():
        return
    for name in DISCARDED:
        shutil.rmtree(run_dir / name, ignore_errors=True)
    record = {
        "number": frozen.number,
        "state": frozen.state.name.lower(),
        "params": frozen.params,
        "eval_loss": frozen.value,
        "intermediate_eval_losses": frozen.intermediate_values,
        "seconds": round(frozen.duration.total_seconds(), 1) if frozen.duration else None,
        "error": frozen.user_attrs.get("error"),
    }
    (run_dir / "trial.json").write_text(json.dumps(record, indent=2) + "\n")
