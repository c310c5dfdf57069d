"""The guardian end to end: injected faults are repaired, and checkpoints survive anything.

Fault injection goes through the documented ``debug.*`` config keys. Runs that must die
(SIGKILL) or receive signals run in a subprocess; the rest run in-process for speed.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import chat_rows, write_jsonl
from tunepilot import hardware
from tunepilot.cli import main

STEPS = 6


@pytest.fixture
def make_config(tmp_path: Path, tiny_model_dir: Path):
    write_jsonl(tmp_path / "train.jsonl", chat_rows(48))
    write_jsonl(tmp_path / "eval.jsonl", chat_rows(4, seed=9))

    def make(name: str = "config.yaml", **debug) -> Path:
        path = tmp_path / name
        path.write_text(
            yaml.safe_dump(
                {
                    "model": str(tiny_model_dir),
                    "data": {"train": "train.jsonl", "eval": "eval.jsonl"},
                    "train": {
                        "max_steps": STEPS,
                        "global_batch_size": 8,
                        "micro_batch_size": 4,
                        "precision": "fp32",
                        "learning_rate": "1e-2",
                        "save_every": 1,
                        "keep_checkpoints": 3,
                        "eval_every": 0,
                        "warmup_steps": 0,
                        # decided, so no planning probe runs: faults must hit the training loop
                        "gradient_checkpointing": False,
                    },
                    "debug": debug,
                }
            )
        )
        return path

    return make


def losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def events(run: Path) -> list[dict]:
    path = run / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"CI": "1"}
    return subprocess.run(
        [sys.executable, "-m", "tunepilot", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
    )


@pytest.fixture
def reference(make_config, tmp_path: Path) -> list[tuple[int, float]]:
    out = tmp_path / "reference"
    assert main(["train", str(make_config("ref.yaml")), "--output-dir", str(out)]) == 0
    assert events(out) == []  # a clean run triggers no repair
    return losses(out)


def test_nan_at_one_step_is_skipped_and_training_finishes(make_config, tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(make_config(nan_at=[2])), "--output-dir", str(out)]) == 0
    assert [e["action"] for e in events(out)] == ["batch skipped"]
    got = losses(out)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    assert all(x == x and x < 100 for _, x in got)  # finite


def test_repeated_nan_rolls_back_and_halves_the_learning_rate(make_config, tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(make_config(nan_at=[3, 4])), "--output-dir", str(out)]) == 0
    actions = [e["action"] for e in events(out)]
    assert actions[0] == "batch skipped"
    assert actions[1].startswith("rolled back to step 0") and "learning rate x0.5" in actions[1]
    steps = [s for s, _ in losses(out)]
    # metrics.jsonl keeps the abandoned steps too (honest history), then the replay
    assert steps == [1, 2, 3, *range(1, STEPS + 1)]


def test_fp16_overflow_storm_switches_precision(make_config, tmp_path, monkeypatch):
    # the plan refuses fp16 on a CPU that only emulates it (plan/precision.py); the guard's
    # fp16 path is under test here, and on the tiny model fp16's speed does not matter
    monkeypatch.setattr(hardware, "cpu_layer_gflops", lambda dtype: 100.0)
    out = tmp_path / "run"
    cfg = make_config(overflow_fp16_from=1)
    assert main(["train", str(cfg), "--output-dir", str(out), "--set", "train.precision=fp16"]) == 0
    kinds = [e["kind"] for e in events(out)]
    assert "fp16 overflow storm" in kinds
    switched = next(e for e in events(out) if e["kind"] == "fp16 overflow storm")
    assert "precision -> bf16" in switched["action"] or "precision -> fp32" in switched["action"]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    # 5 fp16 steps whose updates the scaler skipped, rolled back, then the whole run replayed
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, *range(1, STEPS + 1)]
    assert {r["precision"] for r in steps[-STEPS:]} <= {"bf16", "fp32"}


def test_spike_is_skipped(make_config, tmp_path):
    out = tmp_path / "run"
    cfg = make_config(spike_at=[14])
    assert (
        main(
            [
                "train",
                str(cfg),
                "--output-dir",
                str(out),
                "--set",
                "train.max_steps=16",
                "--set",
                "train.learning_rate=1e-3",
            ]
        )
        == 0
    )
    assert [e["kind"] for e in events(out)] == ["spike"]


def test_oom_halves_micro_batch_without_losing_or_repeating_examples(make_config, tmp_path):
    out = tmp_path / "run"
    cfg = make_config(oom_above=2, log_example_ids=True)
    assert main(["train", str(cfg), "--output-dir", str(out)]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert {r["micro_batch_size"] for r in steps} == {2}
    seen = [i for r in steps for i in r["example_ids"]]
    assert len(seen) == 48 and sorted(seen) == list(range(48))  # one epoch, each exactly once
    plan = json.loads((out / "plan.json").read_text())
    assert plan["knobs"]["global_batch_size"]["value"] == 8  # unchanged
    assert [e["kind"] for e in events(out)] == ["out of memory"]


def test_sigkill_mid_run_then_resume_is_identical(make_config, tmp_path, reference):
    out = tmp_path / "run"
    cfg = make_config(kill_at_step=4)
    first = cli("train", str(cfg), "--output-dir", str(out))
    assert first.returncode == -signal.SIGKILL
    assert losses(out) == reference[:3]
    second = cli("train", str(cfg), "--output-dir", str(out))
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming" in second.stdout
    assert losses(out) == reference


def test_resume_with_relative_config_and_output_paths(make_config, tmp_path, reference):
    """The run's config.yaml holds absolute data paths: relative ones would be read relative
    to the run dir on resume and not be found."""
    make_config(kill_at_step=4)
    first = cli("train", "config.yaml", "--output-dir", "rel", cwd=tmp_path)
    assert first.returncode == -signal.SIGKILL
    second = cli("train", "config.yaml", "--output-dir", "rel", cwd=tmp_path)
    assert second.returncode == 0, second.stdout[-1000:] + second.stderr[-1000:]
    assert losses(tmp_path / "rel") == reference


def test_sigkill_mid_checkpoint_write_then_resume_is_identical(make_config, tmp_path, reference):
    out = tmp_path / "run"
    cfg = make_config(kill_in_checkpoint=3)
    assert cli("train", str(cfg), "--output-dir", str(out)).returncode == -signal.SIGKILL
    assert sorted(
        p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")
    ) == ["step-000001", "step-000002"]
    second = cli("train", str(cfg), "--output-dir", str(out))
    assert second.returncode == 0, second.stderr[-2000:]
    assert "from step-000002" in second.stdout
    assert losses(out) == reference


def test_corrupted_checkpoint_falls_back_to_previous(make_config, tmp_path, reference):
    out = tmp_path / "run"
    cfg = make_config(kill_at_step=5)
    assert cli("train", str(cfg), "--output-dir", str(out)).returncode == -signal.SIGKILL
    newest = out / "checkpoints" / "step-000004" / "trainable.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF
    newest.write_bytes(bytes(data))
    second = cli("train", str(cfg), "--output-dir", str(out), "--resume")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "step-000004 is unusable (trainable.safetensors checksum mismatch)" in second.stdout
    assert "from step-000003" in second.stdout
    assert losses(out) == reference


def test_sigterm_writes_a_checkpoint_and_exits_143(make_config, tmp_path, reference):
    out = tmp_path / "run"
    cfg = make_config(sigterm_at_step=3)
    first = cli("train", str(cfg), "--output-dir", str(out), "--set", "train.save_every=100")
    assert first.returncode == 143, first.stderr[-2000:]
    assert "checkpoint written" in first.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000003"]
    second = cli("train", str(cfg), "--output-dir", str(out), "--set", "train.save_every=100")
    assert second.returncode == 0, second.stderr[-2000:]
    assert losses(out) == reference


def test_disk_full_while_saving_keeps_the_previous_checkpoint(make_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(["train", str(make_config(disk_full_at_checkpoint=3)), "--output-dir", str(out)]) == 3
    )
    err = capsys.readouterr().err
    assert "could not write checkpoint step-000003 (disk full)" in err
    assert "checkpoint step-000002 is intact" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


def test_resume_refuses_data_changed_since_the_run_started(make_config, tmp_path, capsys):
    """The resumed run would take its next examples by position from other data: one line
    naming the file, before anything trains, and the run resumes once the data is back."""
    out = tmp_path / "run"
    assert (
        main(["train", str(make_config(disk_full_at_checkpoint=3)), "--output-dir", str(out)]) == 3
    )
    train = tmp_path / "train.jsonl"
    original = train.read_text()
    rows = original.splitlines()
    resume = ["train", str(make_config("resume.yaml")), "--output-dir", str(out)]
    for edited, counts in (
        (rows[:40], "48 examples then, 40 now"),
        ([rows[1], rows[0], *rows[2:]], "48 examples then and now, different tokens"),
    ):
        train.write_text("\n".join(edited) + "\n")
        capsys.readouterr()
        assert main(resume) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"error: {train}: changed since this run started ({counts}); ")
        assert "restore it, or start a new run with another --output-dir" in line
    train.write_text(original)
    assert main(resume) == 0
    assert "resuming" in capsys.readouterr().out
    assert [step for step, _ in losses(out)] == list(range(1, STEPS + 1))


def test_resume_without_checkpoint_is_a_user_error(make_config, tmp_path, capsys):
    assert main(["train", str(make_config()), "--output-dir", str(tmp_path / "x"), "--resume"]) == 2
    assert "holds no run to resume" in capsys.readouterr().err
