"""Distributed training on CPU: 2 gloo processes must train exactly like 1 process.

The invariant (as in the accumulation test): 2 ranks x micro-batch 4 and 1 rank x micro-batch 8
see the same global batches of 8, so their loss sequences, gradient norms and final weights
agree to float rounding. The data (17 examples) ends each epoch with a batch of 1, which leaves
rank 1 without an example: it must run a blank micro-batch, or the run hangs.

Multi-process runs go through subprocesses (``tunepilot train --nproc 2`` and ``python -m
torch.distributed.run``) in their own process group, killed whole on a timeout so a hang fails
the test instead of blocking CI. The single-process baselines run in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tunepilot
from tests.conftest import chat_rows, tiny_model, tokenized_chat, write_jsonl
from tunepilot import distributed
from tunepilot.cli import main, without_nproc
from tunepilot.data.batching import collate
from tunepilot.train.step import accumulate

TIMEOUT = 240  # seconds for one 2-process run; ~15 s when the machine is idle


# -- pure pieces ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 3, 8, 9])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_slices_concatenate_to_the_global_batch(n: int, world: int):
    batch = list(range(100, 100 + n))
    slices = [distributed.shard(batch, r, world) for r in range(world)]
    assert [i for s in slices for i in s] == batch  # rank order: the single-process order
    sizes = [len(s) for s in slices]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    needed = distributed.micro_batch_count(n, 2, world)
    assert needed == max(-(-size // 2) for size in sizes)


def test_shard_alone_is_the_identity():
    assert distributed.shard([5, 3, 9]) == [5, 3, 9]
    assert distributed.sum_over_ranks([1.5, 2]) == [1.5, 2]
    assert distributed.from_main(lambda: 7) == 7
    assert not distributed.active()


def test_blank_micro_batch_carries_no_loss_and_a_zero_gradient(tokenizer):
    examples = tokenized_chat(tokenizer, 2, seed=4)
    pad = tokenizer.unk_token_id
    model = tiny_model(seed=2)
    real = collate(examples, 256, pad)
    blank = distributed.blank(real)
    assert (blank.supervised_tokens, blank.real_tokens, blank.padded_tokens) == (0, 0, 0)
    loss, tokens = accumulate(model, [blank], "fp32", "cpu", None, normaliser=7)
    assert (loss, tokens) == (0.0, 7)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and not g.any() for g in grads)  # every parameter took part
    alone, _ = accumulate(tiny_model(seed=2), [real], "fp32", "cpu", None)
    padded, _ = accumulate(model, [real, blank], "fp32", "cpu", None)
    assert padded == pytest.approx(alone, rel=1e-6)


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch, capsys):
    """Each process trains on its own GPU: --nproc 2 on a one-GPU machine stops before any
    worker starts (torch.cuda.set_device would fail in the second with a bare traceback)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["train", "--nproc", "2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --nproc 2: this machine has 1 CUDA GPU(s)") and "\n" not in err
    assert "--nproc 1 or fewer" in err and "CUDA_VISIBLE_DEVICES" in err


def test_more_cpu_processes_than_cores_are_refused_before_any_starts(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert main(["train", "--nproc", "3", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: --nproc 3: this machine has 2 CPU core(s) and each process on the CPU needs "
        "one of its own; use --nproc 2 or fewer (torchrun itself, if you mean to share cores)"
    )
    assert distributed.cores_for(2) == 1 and distributed.cores_for(1) == 2


def test_nproc_is_removed_from_the_workers_command_line():
    argv = ["train", "c.yaml", "--nproc", "2", "--set", "a=b", "--nproc=4", "--quiet"]
    assert without_nproc(argv) == ["train", "c.yaml", "--set", "a=b", "--quiet"]
    assert distributed.launch_args(2, ["train", "c.yaml"])[-4:] == [
        "-m",
        "tunepilot",
        "train",
        "c.yaml",
    ]


@pytest.mark.parametrize(("worker_code", "expected"), [(3, 3), (2, 2), (-9, 137)])
def test_launcher_returns_the_failed_workers_exit_code(monkeypatch, worker_code, expected):
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import (
        ChildFailedError,
        ProcessFailure,
    )

    def failing(_args):
        raise ChildFailedError("tunepilot", {1: ProcessFailure(1, 123, worker_code, "")})

    monkeypatch.setattr(torchrun, "run", failing)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert distributed.launch(2, ["train"]) == expected


@pytest.mark.parametrize("under_torchrun", [True, False])
def test_one_ctrl_c_delivered_twice_under_torchrun_still_checkpoints(monkeypatch, under_torchrun):
    """The terminal and torchrun's launcher both deliver a Ctrl-C: the echo is not the user
    insisting (which would skip the checkpoint); alone, a second Ctrl-C still stops at once."""
    from tunepilot.train.signals import graceful_stop

    if under_torchrun:
        monkeypatch.setenv("WORLD_SIZE", "2")
    with graceful_stop() as stop:
        handler = signal.getsignal(signal.SIGINT)
        handler(signal.SIGINT, None)
        if under_torchrun:
            handler(signal.SIGINT, None)
        else:
            with pytest.raises(KeyboardInterrupt):
                handler(signal.SIGINT, None)
    assert stop.signum == signal.SIGINT


# -- end to end: 2 processes against 1 ----------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("dist")
    write_jsonl(root / "train.jsonl", chat_rows(17))
    write_jsonl(root / "eval.jsonl", chat_rows(4, seed=9))
    (root / "model").symlink_to(tiny_model_dir)
    return root


def make_config(root: Path, name: str, method: str = "lora", **train) -> Path:
    """Absolute paths, every knob decided (no probe), 4 steps over batches of 8, 8, 1, 8."""
    settings = {
        "max_steps": 4,
        "global_batch_size": 8,
        "micro_batch_size": 8,
        "precision": "fp32",
        "gradient_checkpointing": False,
        "learning_rate": "1e-3" if method == "lora" else "1e-4",
        "eval_every": 0,
        "save_every": 2,
        "log_to": [],
    }
    path = root / f"{name}.yaml"
    config = {
        "model": str(root / "model"),
        "method": method,
        "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl")},
        "train": settings | train,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def run_processes(command: list[str]) -> subprocess.CompletedProcess:
    """Run ``command`` in a new session; on timeout kill the whole session, workers included."""
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        # the workers must import this tree's tunepilot, wherever the package is installed from
        "PYTHONPATH": os.pathsep.join(
            [str(Path(tunepilot.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(command)} hung for {TIMEOUT}s\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def torchrun(config: Path, out: Path) -> subprocess.CompletedProcess:
    return run_processes(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "tunepilot",
            "train",
            str(config),
            "--output-dir",
            str(out),
            "--quiet",
        ]
    )


def steps(run: Path) -> list[dict]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def assert_same_training(run: Path, reference: Path) -> None:
    got, want = steps(run), steps(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4]
    for a, b in zip(got, want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        # global counts: every rank's slice summed, the blank micro-batch counting nothing
        assert (a["supervised_tokens"], a["real_tokens"]) == (
            b["supervised_tokens"],
            b["real_tokens"],
        )
    # evaluation shared between the ranks reports what one process measures alone
    evals = [json.loads((r / "eval.json").read_text()) for r in (run, reference)]
    for when in ("before", "after"):
        got, want = evals[0][when], evals[1][when]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        matched = [(e["exact_match"]["correct"], e["exact_match"]["total"]) for e in (got, want)]
        assert matched[0] == matched[1] and matched[0][1] == 4
    weights = [load_file(str(r / "model" / "model.safetensors")) for r in (run, reference)]
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[1].items():
        torch.testing.assert_close(weights[0][name], value, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def lora_alone(data_dir: Path) -> Path:
    out = data_dir / "lora-alone"
    config = make_config(data_dir, "lora-alone", log_to=["tensorboard"])
    assert main(["train", str(config), "--output-dir", str(out), "--quiet"]) == 0
    return out


def test_lora_ddp_two_ranks_train_like_one(data_dir: Path, lora_alone: Path):
    """tunepilot train --nproc 2: 2 x micro-batch 4 = 1 x 8, and only rank 0 writes."""
    out = data_dir / "lora-ddp"
    config = make_config(data_dir, "lora-ddp", micro_batch_size=4, log_to=["tensorboard"])
    command = ["train", str(config), "--output-dir", str(out), "--quiet", "--nproc", "2"]
    done = run_processes([sys.executable, "-m", "tunepilot", *command])
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_training(out, lora_alone)
    # rank 0 alone writes and prints: the same files as one process, each written once
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in lora_alone.iterdir())
    assert len(list((out / "tensorboard").iterdir())) == 1
    assert len(steps(out)) == 4 and not (out / "events.jsonl").exists()
    assert done.stdout.count("eval before") == 1 and done.stdout.count("trained 4 steps") == 1
    plan = json.loads((out / "plan.json").read_text())
    assert plan["hardware"]["processes"] == 2
    assert plan["knobs"]["gradient_accumulation_steps"]["value"] == 1
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["micro_batch_size"] == 4


def test_lora_ddp_resumes_after_a_kill(data_dir: Path, lora_alone: Path):
    """torchrun directly; both ranks SIGKILLed before step 3, after the step-2 checkpoint."""
    out = data_dir / "lora-killed"
    config = make_config(data_dir, "lora-killed", micro_batch_size=4)
    config_data = yaml.safe_load(config.read_text()) | {"debug": {"kill_at_step": 3}}
    config.write_text(yaml.safe_dump(config_data))
    killed = torchrun(config, out)
    assert killed.returncode != 0
    assert [r["step"] for r in steps(out)] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    resumed = torchrun(config, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    assert_same_training(out, lora_alone)


def test_out_of_memory_on_a_rank_stops_the_run_with_exit_3(data_dir: Path):
    """Ranks cannot shrink their micro-batch together mid-step: stop with a diagnosis, and
    the launcher passes the worker's exit code on."""
    out = data_dir / "lora-oom"
    config = make_config(data_dir, "lora-oom", micro_batch_size=4)
    config_data = yaml.safe_load(config.read_text()) | {"debug": {"oom_above": 2}}
    config.write_text(yaml.safe_dump(config_data))
    command = ["train", str(config), "--output-dir", str(out), "--quiet", "--nproc", "2"]
    done = run_processes([sys.executable, "-m", "tunepilot", *command])
    assert done.returncode == 3, done.stderr[-3000:]
    assert "error: out of memory on rank 0 at step 1 with micro-batch 4" in done.stderr


def test_fsdp2_full_finetune_trains_like_one_process_and_resumes(data_dir: Path):
    """FSDP2 on gloo: sharded training, checkpoints gathered to rank 0 and scattered back on
    resume, and the final weights gathered for export, all equal to one process's."""
    alone = data_dir / "full-alone"
    config = make_config(data_dir, "full-alone", method="full")
    assert main(["train", str(config), "--output-dir", str(alone), "--quiet"]) == 0
    out = data_dir / "full-fsdp"
    config = make_config(data_dir, "full-fsdp", method="full", micro_batch_size=4)
    config_data = yaml.safe_load(config.read_text()) | {"debug": {"kill_at_step": 3}}
    config.write_text(yaml.safe_dump(config_data))
    assert torchrun(config, out).returncode != 0
    resumed = torchrun(config, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "FSDP2" in resumed.stdout
    assert_same_training(out, alone)
