"""The memory a run logs is training's own peak, not what ran in the process before it."""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from tests.conftest import write_run_config
from tunepilot import hardware
from tunepilot.config import load_config
from tunepilot.run import train

SPIKE_GB = 1.5


def test_logged_memory_leaves_out_what_peaked_before_training(tmp_path: Path, tiny_model_dir):
    """Before training, the batch probe runs its worst-case trials in the same process; the
    report compares the logged peak with the plan's prediction for training, so the probe's
    peak must not show up in it. A 1.5 GB spike stands in for the probe here."""
    if not hardware.reset_peak_memory("cpu"):
        pytest.skip("this system cannot reset a process's peak resident memory")
    config = write_run_config(
        tmp_path,
        tiny_model_dir,
        {
            "max_steps": 2,
            "global_batch_size": 4,
            "micro_batch_size": 4,
            "precision": "fp32",
            "gradient_checkpointing": False,
            "probe_seconds": 0,
            "eval_every": 0,
        },
    )
    # an anonymous mapping goes back to the system when closed, whatever malloc's settings
    with mmap.mmap(-1, int(SPIKE_GB * 2**30)) as spike:
        np.frombuffer(spike, dtype=np.uint8)[:] = 1  # touch every page: resident
    spiked = hardware.peak_rss_gb()
    out = train(load_config(config, output_dir=str(tmp_path / "run")), Console(quiet=True), True)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = max(r["memory_gb"] for r in records if "memory_gb" in r)
    assert 0 < logged < spiked - SPIKE_GB + 0.5, (logged, spiked)
