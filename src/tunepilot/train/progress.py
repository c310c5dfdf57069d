"""Where training numbers go: metrics.jsonl (always) and the terminal (bar, or lines when quiet)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from tunepilot.train.trackers import Trackers


class Reporter:
    """Appends one JSON object per event to metrics.jsonl and shows progress."""

    def __init__(
        self,
        path: Path,
        total_steps: int,
        quiet: bool,
        console: Console,
        trackers: Trackers | None = None,
    ) -> None:
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.trackers = trackers
        self.total = total_steps
        self.quiet = quiet
        self.console = console
        self.every = max(1, total_steps // 20)
        self.progress: Progress | None = None
        self.task: Any = None

    def start(self, completed: int = 0) -> None:
        if self.quiet:
            return
        self.progress = Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=self.total, completed=completed, status=""
        )

    def log(self, record: dict[str, Any], show: bool = True, event: str = "") -> None:
        """Append a record; ``event`` (a guardian repair) is shown in the progress line."""
        self.file.write(json.dumps(record | {"time": round(time.time(), 3)}) + "\n")
        self.file.flush()
        if self.trackers:
            self.trackers.log(record)
        if not show:
            return
        if "eval_loss" in record:
            self._print(f"step {record['step']}: eval loss {record['eval_loss']:.4f}")
            return
        status = (
            f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:.0f} tok/s"
        )
        if event:
            status += f"  [guardian: {event}]"
            if self.progress is not None:  # the bar overwrites its status; keep events visible
                self._print(f"step {record['step']}: guardian {event}")
        if self.progress is not None:
            self.progress.update(self.task, completed=record["step"], status=status)
        elif event or record["step"] % self.every == 0 or record["step"] == self.total:
            eta = record["elapsed_s"] / record["step"] * (self.total - record["step"])
            self.console.print(
                f"step {record['step']}/{self.total}  {status}  eta {eta:.0f}s", highlight=False
            )

    def _print(self, text: str) -> None:
        (self.progress.console if self.progress else self.console).print(text, highlight=False)

    def stop(self) -> None:
        """End the live display (the file stays open for the final evaluation)."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def close(self) -> None:
        self.stop()
        self.file.close()
        if self.trackers:
            self.trackers.close()
