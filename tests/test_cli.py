"""End to end through the CLI on a tiny model: the exact files a run writes, and bad inputs."""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import chat_rows, write_jsonl, write_run_config
from tunepilot.cli import main
from tunepilot.errors import UserError
from tunepilot.hardware import detect


@pytest.fixture
def config(tmp_path: Path, tiny_model_dir: Path) -> Path:
    return write_run_config(
        tmp_path,
        tiny_model_dir,
        {
            "max_steps": 4,
            "global_batch_size": 8,
            "micro_batch_size": 4,
            "precision": "fp32",
            "eval_every": 2,
            "save_every": 2,
            "learning_rate": "1e-3",
        },
    )


def test_train_writes_exactly_these_files(config: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(config), "--output-dir", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter",
        "checkpoints",
        "config.yaml",
        "eval.json",
        "metrics.jsonl",
        "model",
        "plan.json",
        "plots",
        "report.html",
        "tensorboard",
    ]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (out / "adapter").iterdir()
    }
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    } <= {p.name for p in (out / "model").iterdir()}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["padding_fraction"] >= 0 and r["tokens_per_s"] > 0 for r in steps)
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 4]
    evals = json.loads((out / "eval.json").read_text())
    assert evals["before"]["exact_match"]["total"] == 6
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["micro_batch_size"] == 4
    assert "auto" not in {
        resolved["train"][k] for k in ("learning_rate", "scheduler", "max_length", "precision")
    }
    assert "outputs in" in capsys.readouterr().out


def test_plan_json_contract(config: Path, capsys):
    assert main(["plan", str(config), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    for knob in (
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
        "padding_side",
        "pad_token",
    ):
        entry = plan["knobs"][knob]
        assert entry["source"] in ("user", "auto", "default") and entry["reason"].strip()
    assert plan["knobs"]["gradient_accumulation_steps"]["value"] == 2
    assert plan["knobs"]["total_steps"]["value"] == 4
    assert "max_steps governs" in plan["knobs"]["total_steps"]["reason"]
    assert plan["knobs"]["pad_token"]["value"] != "<|im_end|>"  # never alias EOS
    data = plan["data"]
    assert data["format"] == "messages" and data["train_examples"] == 40
    assert data["supervised_tokens"] > 0 and data["truncated_examples"] == 0
    assert set(data["length_percentiles"]) >= {"p50", "p99", "max"}
    assert plan["hardware"]["device"] == detect().device and "bf16" in plan["hardware"]
    assert plan["model"]["trainable_parameters"] < plan["model"]["total_parameters"]


def test_plan_show_sample_marks_trained_tokens(config: Path, capsys):
    assert main(["plan", str(config), "--show-sample", "1"]) == 0
    out = capsys.readouterr().out
    assert "label audit" in out and "[[" in out and "<|im_end|>" in out


def test_epochs_govern_without_max_steps(config: Path, capsys):
    assert (
        main(
            [
                "plan",
                str(config),
                "--json",
                "--set",
                "train.max_steps=-1",
                "--set",
                "train.num_epochs=2",
            ]
        )
        == 0
    )
    knobs = json.loads(capsys.readouterr().out)["knobs"]
    assert knobs["total_steps"]["value"] == 10  # 40 examples / 8 per step x 2 epochs
    assert "num_epochs governs" in knobs["total_steps"]["reason"]


def error_of(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_malformed_json_line_exits_2_naming_the_line(config: Path, tmp_path: Path, capsys):
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    lines[2] = '{"messages": [oops'
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    err = error_of(capsys, "plan", str(config))
    assert "train.jsonl:3" in err


def test_row_without_assistant_turn_exits_2(config: Path, tmp_path: Path, capsys):
    write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    err = error_of(capsys, "plan", str(config))
    assert "train.jsonl:1" in err and "assistant" in err


def test_too_few_examples_for_the_batch(config: Path, tmp_path: Path, capsys):
    write_jsonl(tmp_path / "train.jsonl", chat_rows(5))
    err = error_of(capsys, "plan", str(config))
    assert "5 training examples, fewer than train.global_batch_size 8" in err


def test_max_length_beyond_context(config: Path, capsys):
    err = error_of(capsys, "plan", str(config), "--set", "train.max_length=4096")
    assert "train.max_length: 4096 exceeds the model's context of 512" in err


def test_bad_config_value_exits_2(config: Path, capsys):
    err = error_of(capsys, "plan", str(config), "--set", "train.learning_rate=-1")
    assert "train.learning_rate: must be > 0" in err


def test_finished_run_dir_is_not_overwritten(config: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(config), "--output-dir", str(out), "--quiet"]) == 0
    err = error_of(capsys, "train", str(config), "--output-dir", str(out))
    assert "already holds a finished run" in err


@pytest.mark.parametrize(
    ("where", "why"),
    [("file", "a file is in the way"), ("file/run", "{tmp}/file is a file")],
)
def test_an_output_dir_that_cannot_be_made_fails_before_planning(
    config: Path, tmp_path: Path, capsys, where: str, why: str
):
    (tmp_path / "file").write_text("")
    out = tmp_path / where
    assert main(["train", str(config), "--output-dir", str(out)]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    reason = why.format(tmp=tmp_path)
    assert line == f"error: output_dir: {out}: {reason}, not a directory; pass another --output-dir"
    assert captured.out == ""  # no data read, no plan, no probe before the error


def test_a_folder_of_the_users_own_is_not_overwritten_by_a_run(
    config: Path, tmp_path: Path, capsys
):
    own = tmp_path / "project"
    (own / "model").mkdir(parents=True)
    (own / "model" / "config.json").write_text("{}")
    (own / "config.yaml").write_text("# mine\n")
    (own / "notes.txt").write_text("mine")
    assert main(["train", str(config), "--output-dir", str(own)]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line == (
        f"error: output_dir: {own} is not a tunepilot run but holds config.yaml, model/, "
        "which the run would overwrite; pass a new or empty --output-dir"
    )
    assert captured.out == "" and (own / "config.yaml").read_text() == "# mine\n"
    (own / "config.yaml").unlink()
    shutil.rmtree(own / "model")  # unrelated files alone are no clash: the run goes ahead
    assert main(["train", str(config), "--output-dir", str(own), "--quiet"]) == 0
    assert (own / "notes.txt").read_text() == "mine" and (own / "plan.json").is_file()


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("tunepilot ")


def test_tensorboard_events_hold_the_curves(config: Path, tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["train", str(config), "--output-dir", str(out), "--quiet"]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/loss"} <= set(tags)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_tracker_not_installed_is_a_user_error(config: Path, tmp_path: Path, capsys):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    err = error_of(
        capsys,
        "train",
        str(config),
        "--output-dir",
        str(tmp_path / "r"),
        "--set",
        "train.log_to=[tensorboard, wandb]",
    )
    assert "train.log_to: wandb requested but not installed" in err


def test_an_internal_error_is_one_line_with_the_traceback_saved(monkeypatch, capsys):
    """A bug is not bad input: one line naming the exception and where its traceback is."""
    from tunepilot import cli

    def broken(args, console):
        raise RuntimeError("Expected all tensors to be on the same device\nmore detail")

    monkeypatch.delenv("TUNEPILOT_TRACEBACK")
    monkeypatch.setattr(cli, "_dispatch", broken)
    assert main(["train", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: internal error, RuntimeError: Expected all")
    saved = Path(err.split("the traceback is in ")[1].split(" ")[0])
    assert "Traceback" in saved.read_text() and "more detail" in saved.read_text()
    saved.unlink()
    monkeypatch.setenv("TUNEPILOT_TRACEBACK", "1")  # developers see the real thing
    with pytest.raises(RuntimeError):
        main(["train", "--quiet"])


def test_sigterm_before_training_is_one_line_and_exit_143(monkeypatch, capsys):
    """Planning and loading have no checkpoint to write: SIGTERM there stops the command as
    Ctrl-C does (a probe's worker is killed on the way), with one line, not a silent death."""
    import os
    import signal
    import time

    from tunepilot import cli

    def dispatch(args, out):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # interrupted by the handler well before this ends
        return 0

    monkeypatch.setattr(cli, "_dispatch", dispatch)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["plan", "config.yaml"]) == 143
    assert capsys.readouterr().err.strip() == "error: terminated (SIGTERM)"
    assert signal.getsignal(signal.SIGTERM) is before


def test_errors_before_dispatch_print_one_line_per_problem(monkeypatch, capsys):
    """The allocator restart and the --nproc launcher fail before any command runs; their
    errors read like every other one: ``error:`` on each line, exit 2."""
    from tunepilot import distributed

    monkeypatch.setattr("sys.argv", ["tunepilot", "train", "--quiet"])
    monkeypatch.setenv("TUNEPILOT_ALLOCATOR", "jemalloc")
    assert main() == 2
    assert capsys.readouterr().err.startswith("error: TUNEPILOT_ALLOCATOR=jemalloc: must be")
    monkeypatch.delenv("TUNEPILOT_ALLOCATOR")
    assert main(["train", "--nproc", "0", "--quiet"]) == 2
    assert capsys.readouterr().err == "error: --nproc 0: need at least 1 process\n"

    def two_problems(nproc, argv):
        raise UserError("first problem", "second problem")

    monkeypatch.setattr(distributed, "launch", two_problems)
    assert main(["train", "--nproc", "2", "--quiet"]) == 2
    assert capsys.readouterr().err == "error: first problem\nerror: second problem\n"


LONG_PROMPT = [
    {
        "messages": [
            {"role": "user", "content": "alpha " * 200},
            {"role": "assistant", "content": "ok"},
        ]
    }
] * 10


def test_a_max_length_that_leaves_no_targets_stops_before_the_probe(
    config: Path, tmp_path: Path, capsys
):
    """Answers after a long prompt, cut away by max_length: one line naming the file and the
    length that keeps them, where training used to start, skip every batch and stop at step 1
    blaming the learning rate."""
    data = write_jsonl(tmp_path / "long-train.jsonl", LONG_PROMPT)
    argv = ["plan", str(config), "--set", f"data.train={data}", "--set", "train.max_length=64"]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {data}: cut to max_length 64, every one of its 10 training")
    assert "max_length to at least 256" in line
    argv[-1] = "train.max_length=256"  # the length it names keeps the answers
    assert main(argv) == 0
    # some examples emptied, not all: a warning that says what is lost
    write_jsonl(data, LONG_PROMPT + chat_rows(3))
    argv[-1] = "train.max_length=64"
    capsys.readouterr()
    assert main(argv) == 0
    said = " ".join(" ".join(capsys.readouterr()).split())
    assert "10 training examples exceed max_length 64" in said
    assert "10 examples lose all targets" in said


def test_evaluations_score_eval_examples_longer_than_max_length_whole(
    config: Path, tmp_path: Path, capsys
):
    """Eval answers past the training max_length: scored whole (up to the model's context),
    not cut to nothing (the eval loss was NaN) or to a part."""
    data = write_jsonl(tmp_path / "long-eval.jsonl", LONG_PROMPT + chat_rows(3))
    out = tmp_path / "run"
    argv = ["train", str(config), "--set", f"data.eval={data}", "--set", "train.max_length=64"]
    assert main([*argv, "--output-dir", str(out), "--quiet"]) == 0
    assert "eval examples exceed" not in " ".join(capsys.readouterr())
    # what evaluations score, planned once: micro-batch 4 x max_length 64
    assert json.loads((out / "plan.json").read_text())["data"]["eval_max_length"] == 256
    evals = json.loads((out / "eval.json").read_text())
    curve = [
        json.loads(line)["eval_loss"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if "eval_loss" in line
    ]
    assert len(curve) == 3 and all(math.isfinite(x) for x in curve)  # steps 0, 2 and 4
    # the same loss as scoring each example alone, uncut, with the training loss function
    from tunepilot.config import load_config
    from tunepilot.data.batching import collate
    from tunepilot.data.tokenize import tokenize_examples
    from tunepilot.inference import load_for_inference, load_tokenizer
    from tunepilot.run import load_examples
    from tunepilot.train.step import loss_sum

    cfg = load_config(out / "config.yaml", output_dir=str(out))
    tokenizer = load_tokenizer(str(out))
    _, eval_rows, _, _ = load_examples(cfg)
    examples = tokenize_examples(eval_rows, tokenizer)
    assert max(len(ex.input_ids) for ex in examples) > 200
    model = load_for_inference(str(out), tokenizer).model
    total = tokens = 0
    with torch.no_grad():
        for ex in examples:
            batch = collate([ex], 4096, tokenizer.pad_token_id)
            total += float(loss_sum(model, batch, "fp32", "cpu"))
            tokens += batch.supervised_tokens
    assert evals["after"]["loss"] == pytest.approx(total / tokens, rel=1e-4)


def test_eval_examples_beyond_what_evaluations_score_are_named(
    config: Path, tmp_path: Path, capsys
):
    """Evaluations score up to micro_batch_size x max_length tokens of an example: an eval set
    whose every target lies beyond is an error naming the fix, a partly cut one a warning."""
    data = write_jsonl(tmp_path / "long-eval.jsonl", LONG_PROMPT)
    argv = ["plan", str(config), "--set", f"data.eval={data}", "--set", "train.max_length=64"]
    argv += ["--set", "train.micro_batch_size=1"]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(
        f"error: {data}: cut to the length evaluations score, 64, every one of its 10 eval"
    )
    assert "micro_batch_size x max_length tokens of each example: raise train.max_length" in line
    write_jsonl(data, LONG_PROMPT + chat_rows(3))
    assert main(argv) == 0
    said = " ".join(" ".join(capsys.readouterr()).split())
    assert "10 eval examples are longer than evaluations score (64 tokens" in said
    assert "(10 examples count for nothing)" in said


@pytest.mark.parametrize("damage", ["no tokenizer", "bad config", "cut weights", "bad gguf"])
def test_a_damaged_model_is_one_line_naming_it(
    config: Path, tiny_model_dir: Path, tmp_path: Path, damage: str, capsys
):
    """Model files users break by hand or by a partial copy: exit 2 with what to do, never an
    internal error with a traceback."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    if damage == "no tokenizer":
        for f in model.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                f.unlink()
        expected = "cannot load tokenizer"
    elif damage == "bad config":
        (model / "config.json").write_text('{"model_type": ')
        expected = "cannot load config"
    elif damage == "cut weights":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        expected = "cannot load its weights"
    else:
        model = tmp_path / "broken.gguf"
        model.write_bytes(b"GGUF\x03\x00\x00\x00")
        expected = "not a GGUF file transformers can read"
    argv = ["train", str(config), "--set", f"model={model}", "--output-dir", str(tmp_path / "r")]
    assert main([*argv, "--set", "train.gradient_checkpointing=false", "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"error: model: {model}") and expected in lines[-1]
    assert not any("internal error" in line or "Traceback" in line for line in lines)


def test_plan_warns_about_a_learning_rate_far_from_the_rule(config: Path, capsys):
    assert main(["plan", str(config), "--set", "train.learning_rate=5"]) == 0
    said = " ".join(" ".join(capsys.readouterr()).split())
    assert "warning: learning_rate 5 is" in said and "the rule's" in said
    assert main(["plan", str(config)]) == 0  # its own 1e-3: no warning
    assert "warning: learning_rate" not in " ".join(capsys.readouterr())


def test_the_audit_line_shows_trained_tokens_only():
    from rich.console import Console

    from tunepilot.data.tokenize import Tokenized
    from tunepilot.plan.render import audit_line

    class Words:
        def decode(self, ids: list[int]) -> str:
            return " ".join(f"w{i}" for i in ids)

    # two answers: tokens 2-3 and 6 are trained; 4-5 (the next user turn) are not
    example = Tokenized(
        list(range(8)), [False, False, True, True, False, False, True, False], 6, "x", "f:1"
    )
    console = Console(record=True, width=200)
    audit_line(example, Words(), console, 8)
    line = console.export_text()
    assert "3 of 8 tokens carry loss, first trained tokens 'w2 w3'" in line


def test_the_plan_records_the_system_message_all_training_examples_share(config: Path, capsys):
    assert main(["plan", str(config), "--json"]) == 0
    assert "system_prompt" not in json.loads(capsys.readouterr().out)["data"]  # mixed: none
    rows = chat_rows(40)
    for row in rows:
        if row["messages"][0]["role"] != "system":
            row["messages"].insert(0, {"role": "system", "content": "Be brief."})
    write_jsonl(config.parent / "train.jsonl", rows)
    assert main(["plan", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["system_prompt"] == "Be brief."


def test_the_plan_warns_when_eval_examples_are_training_examples(config: Path, capsys):
    assert main(["plan", str(config), "--json"]) == 0
    assert not any("also training" in w for w in json.loads(capsys.readouterr().out)["warnings"])
    same = f"data.eval={config.parent / 'train.jsonl'}"
    assert main(["plan", str(config), "--json", "--set", same]) == 0
    (warning,) = [
        w for w in json.loads(capsys.readouterr().out)["warnings"] if "also training" in w
    ]
    assert warning.startswith("40 of 40 eval examples are also training examples, word for word")


def test_a_seeded_split_holds_out_only_what_evaluations_read(tmp_path: Path):
    from tunepilot.config import load_config
    from tunepilot.run import load_examples

    write_jsonl(tmp_path / "train.jsonl", chat_rows(100))
    (tmp_path / "c.yaml").write_text("data: {train: train.jsonl, eval_fraction: 0.3}\n")
    capped = load_config(tmp_path / "c.yaml", ["data.eval_max_examples=5"])
    train, eval_, _, available = load_examples(capped)
    assert (len(train), len(eval_), available) == (95, 5, 5)  # every row trains or is scored
    train, eval_, _, _ = load_examples(load_config(tmp_path / "c.yaml"))
    assert (len(train), len(eval_)) == (70, 30)
    where = {ex.where for ex in train} | {ex.where for ex in eval_}
    assert len(where) == 100


def test_a_capped_eval_file_is_a_seeded_sample_not_its_head(tmp_path: Path):
    from tunepilot.config import load_config
    from tunepilot.run import load_examples

    write_jsonl(tmp_path / "train.jsonl", chat_rows(10))
    write_jsonl(tmp_path / "eval.jsonl", chat_rows(50, seed=4))
    (tmp_path / "c.yaml").write_text("data: {train: train.jsonl, eval: eval.jsonl}\n")
    cfg = load_config(tmp_path / "c.yaml", ["data.eval_max_examples=8"])
    _, eval_, _, available = load_examples(cfg)
    lines = [int(ex.where.rsplit(":", 1)[1]) for ex in eval_]
    assert available == 50 and len(lines) == 8 and lines == sorted(lines)
    assert max(lines) > 8  # not the first 8 rows
    assert [ex.where for ex in load_examples(cfg)[1]] == [ex.where for ex in eval_]  # seeded


def test_a_run_directory_another_process_is_writing_is_refused(
    config: Path, tmp_path: Path, capsys
):
    import subprocess
    import sys

    out = tmp_path / "run"
    out.mkdir()
    (out / "plan.json").write_text("{}")  # an unfinished run: a second command would resume it
    (out / "checkpoints" / ".tmp-step-3").mkdir(parents=True)  # the other's write in progress
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
            "fcntl.flock(f, fcntl.LOCK_EX); f.write('4242\\n'); f.flush(); print('held', "
            "flush=True); time.sleep(60)",
            str(out / ".lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["train", str(config), "--output-dir", str(out)]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line == (
            f"error: output_dir: {out} is being written by another tunepilot process (pid "
            "4242); wait for it to end, stop it, or pass another --output-dir"
        )
        assert (out / "checkpoints" / ".tmp-step-3").is_dir()  # not cleaned from under it
    finally:
        holder.kill()
        holder.wait()
    # once that process is gone the lock goes with it: the same command takes the directory
    from tunepilot.rundir import hold, release_all

    hold(out)
    assert (out / ".lock").read_text().strip() == str(os.getpid())
    release_all()
    assert not (out / ".lock").exists()
