"""Checkpoints of the trainable weights (safetensors, written atomically).

The spine saves weights only; resumable checkpoints with optimizer, RNG and data position are the
guardian's job and will extend this module.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file
from torch import nn


def trainable_state(model: nn.Module) -> dict:
    return {
        name: p.detach().cpu().contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def save_checkpoint(model: nn.Module, run_dir: Path, step: int) -> Path:
    target = run_dir / "checkpoints" / f"step-{step:06d}"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        with open(tmp / "trainable.safetensors", "rb") as f:
            os.fsync(f.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # readers see a whole checkpoint or none
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
