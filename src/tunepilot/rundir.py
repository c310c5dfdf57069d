"""Read what ``tunepilot train`` left in a run directory, for reports and run listings.

Readers are forgiving: a run that is still going (no ``eval.json`` yet) or was killed mid-write
(a half-written last line in ``metrics.jsonl``) still yields everything that is readable, and
what was skipped is listed in ``problems`` so the report can say so instead of failing.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunepilot.errors import UserError


@dataclass
class RunFiles:
    """Everything readable in one run directory."""

    path: Path
    plan: dict[str, Any]
    config_text: str | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)  # train records (have "loss")
    evals: list[dict[str, Any]] = field(default_factory=list)  # records with "eval_loss"
    events: list[dict[str, Any]] | None = None  # events.jsonl; None when the file is absent
    summary: dict[str, Any] | None = None  # eval.json
    problems: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def started(self) -> float:
        """Start time (epoch seconds): the first logged record, else plan.json's mtime."""
        times = [
            r["time"] for r in self.evals + self.steps if isinstance(r.get("time"), int | float)
        ]
        return min(times) if times else (self.path / "plan.json").stat().st_mtime

    @property
    def date(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(self.started))


#: what a run writes at the top of its directory (overwriting or, for the logs, deleting what
#: was there), besides plan.json, which marks the folder as a run's
RUN_OUTPUTS = (
    "config.yaml",
    "metrics.jsonl",
    "events.jsonl",
    "eval.json",
    "report.html",
    "model",
    "adapter",
    "checkpoints",
    "plots",
    "tensorboard",
    "export",
)


#: held (flock) by the process writing a run directory, removed when it is done
LOCK_NAME = ".lock"
_held: dict[Path, Any] = {}


def hold(run_dir: Path) -> None:
    """Keep every other tunepilot process out of ``run_dir`` while this one writes it. A second
    process on the same directory (the command run again in another terminal, or a scheduler
    requeueing a job whose first copy still runs) would otherwise resume it alongside, delete
    the first one's half-written checkpoint and interleave their metrics. Idempotent; the lock
    dies with the process, so a killed run leaves nothing that blocks its resume."""
    key = run_dir.absolute()
    if key in _held:
        return
    handle = open(run_dir / LOCK_NAME, "a+", encoding="utf-8")  # noqa: SIM115 (held open)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid = handle.read().strip() or "?"
        handle.close()
        raise UserError(
            f"output_dir: {run_dir} is being written by another tunepilot process (pid {pid}); "
            "wait for it to end, stop it, or pass another --output-dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held[key] = handle


def release_all() -> None:
    """Give up every run directory this process holds (its run ended, finished or not)."""
    for path, handle in list(_held.items()):
        (path / LOCK_NAME).unlink(missing_ok=True)
        handle.close()
        del _held[path]


def is_run_dir(path: Path) -> bool:
    return (path / "plan.json").is_file()


def read_plan(path: Path) -> dict[str, Any]:
    """A run directory's plan.json; UserError when it is not one (no readable plan.json)."""
    if not path.is_dir():
        raise UserError(f"{path}: no such directory; pass a run directory written by train")
    if not is_run_dir(path):
        raise UserError(
            f"{path}: not a run directory (no plan.json); pass the --output-dir of a train run"
        )
    plan = _read_json(path / "plan.json")
    if not isinstance(plan, dict):
        raise UserError(f"{path / 'plan.json'}: not a JSON object; the run directory is damaged")
    return plan


def read_run(path: Path) -> RunFiles:
    """Read a run directory; UserError when it is not one (no readable plan.json)."""
    run = RunFiles(path=path, plan=read_plan(path))
    if (path / "config.yaml").is_file():
        run.config_text = (path / "config.yaml").read_text(encoding="utf-8", errors="replace")
    records = _read_jsonl(path / "metrics.jsonl", run.problems)
    run.steps = _last_per_step([r for r in records if _number(r.get("loss")) is not None])
    run.evals = [r for r in records if _number(r.get("eval_loss")) is not None]
    if (path / "events.jsonl").is_file():
        run.events = _read_jsonl(path / "events.jsonl", run.problems)
    if (path / "eval.json").is_file():
        try:
            summary = _read_json(path / "eval.json")
            run.summary = summary if isinstance(summary, dict) else None
        except UserError as exc:
            run.problems.extend(exc.problems)
    return run


def _last_per_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """After a guardian rollback the replayed steps are logged again: keep the last record of
    each step (what the final weights went through), in step order."""
    by_step = {r.get("step"): r for r in records if _number(r.get("step")) is not None}
    return [by_step[s] for s in sorted(by_step)]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable ({exc}); the run directory is damaged") from None


def _read_jsonl(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    """One JSON object per line; bad lines are skipped and noted (a killed run leaves one)."""
    if not path.is_file():
        return []
    records = []
    text = path.read_text(encoding="utf-8", errors="replace")
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"{path.name}:{lineno}: not valid JSON, skipped")
            continue
        if isinstance(value, dict):
            records.append(value)
        else:
            problems.append(f"{path.name}:{lineno}: not a JSON object, skipped")
    return records


def _number(value: Any) -> float | None:
    """A finite-or-not float from a JSON value; None for missing, bools and text."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) for the records that have a numeric ``key``."""
    xs, ys = [], []
    for r in records:
        step, value = _number(r.get("step")), _number(r.get(key))
        if step is not None and value is not None:
            xs.append(step)
            ys.append(value)
    return xs, ys


def step_seconds(steps: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Compute time of each optimizer step, recovered as real_tokens / tokens_per_s (the loop
    measures both over the same interval; evaluation runs between steps are not included)."""
    xs, ys = [], []
    for r in steps:
        step, real, rate = (_number(r.get(k)) for k in ("step", "real_tokens", "tokens_per_s"))
        if step is not None and real is not None and rate:
            xs.append(step)
            ys.append(real / rate)
    return xs, ys


def knob(plan: dict[str, Any], name: str) -> Any:
    entry = plan.get("knobs", {}).get(name)
    return entry.get("value") if isinstance(entry, dict) else None
