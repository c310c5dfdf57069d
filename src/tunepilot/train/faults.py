"""Fault injection for tests and the soak benchmark (config section ``debug``).

Each hook is a no-op unless its key is set, so production runs pay nothing. The faults are
injected where real ones appear: NaN and overflow in the gradients after backward, OOM when a
micro-batch is built, SIGKILL between steps or in the middle of a checkpoint write.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

from torch import nn

from tunepilot.config import DebugSettings
from tunepilot.hardware import fail_allocation


class Faults:
    def __init__(self, settings: DebugSettings, run_dir: Path) -> None:
        self.s = settings
        self.run_dir = run_dir
        self.injected = 0

    def _once(self, name: str) -> bool:
        """Kills and signals fire once per run directory, so the re-run can get past them."""
        marker = self.run_dir / f".fault-{name}"
        if marker.exists():
            return False
        marker.touch()
        return True

    def before_step(self, step: int) -> None:
        if self.s.kill_at_step == step and self._once(f"kill-{step}"):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.s.sigterm_at_step == step and self._once(f"sigterm-{step}"):
            os.kill(os.getpid(), signal.SIGTERM)  # handled like a real preemption notice

    def check_oom(self, micro_batch_size: int, device: str) -> None:
        if self.s.oom_above is not None and micro_batch_size > self.s.oom_above:
            self.injected += 1
            fail_allocation(device)  # CUDA's OutOfMemoryError, or the CPU allocator's error

    def after_backward(self, model: nn.Module, position: int, precision: str, loss: float) -> float:
        """Poison gradients (and the reported loss) the way a real fault would."""
        poison = None
        if position in self.s.nan_at:
            poison, loss = float("nan"), float("nan")
        elif (
            self.s.overflow_fp16_from is not None
            and precision == "fp16"
            and position >= self.s.overflow_fp16_from
        ):
            poison = float("inf")
        elif position in self.s.spike_at:
            loss *= 50.0
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(1e4)
            self.injected += 1
        if poison is not None:
            self.injected += 1
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(poison)
        return loss

    def during_checkpoint(self, step: int) -> None:
        if self.s.kill_in_checkpoint == step and self._once(f"kill-checkpoint-{step}"):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.s.disk_full_at_checkpoint == step:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
