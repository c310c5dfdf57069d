"""``tunepilot eval`` and ``tunepilot chat`` on a tiny model."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from tests.conftest import chat_rows, write_jsonl
from tests.fake_run import make_run
from tunepilot.chat import Conversation, one_shot, repl, reply
from tunepilot.cli import main
from tunepilot.errors import UserError
from tunepilot.inference import load_for_inference


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "run", tiny_model_dir)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "eval.jsonl", chat_rows(6, seed=3))


def test_eval_prints_loss_perplexity_and_exact_match(run_dir: Path, data: Path, capsys):
    assert main(["eval", str(run_dir), "--data", str(data), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    loss = float(re.search(r"loss (\d+\.\d+)", out).group(1))
    perplexity = float(re.search(r"perplexity (\d+\.\d+)", out).group(1))
    assert 5 < loss < 20  # a random 49k-vocabulary model: about ln(49152) = 10.8
    assert perplexity == pytest.approx(2.718281828**loss, rel=1e-3)
    assert "6 examples (messages)" in out and "exact match 0/6 (0.0%)" in out


def test_eval_a_model_directory_with_a_custom_scorer(
    tiny_model_dir: Path, data: Path, tmp_path: Path, monkeypatch, capsys
):
    (tmp_path / "my_scorers.py").write_text(
        "def half(expected, generated):\n    return 0.5\n"
        "def broken(expected, generated):\n    return 'yes'\n"
    )
    monkeypatch.chdir(tmp_path)  # found in the working directory, as python -m would
    argv = ["eval", str(tiny_model_dir), "--data", str(data), "--max-new-tokens", "2"]
    assert main([*argv, "--scorer", "my_scorers:half", "--batch-size", "4"]) == 0
    assert "score (my_scorers:half) 3/6 (50.0%)" in capsys.readouterr().out
    assert main([*argv, "--scorer", "my_scorers:broken"]) == 2
    assert "returned 'yes'" in capsys.readouterr().err
    assert main([*argv, "--scorer", "my_scorers:missing"]) == 2
    assert "has no attribute 'missing'" in capsys.readouterr().err
    assert main([*argv, "--scorer", "no_such_module:f"]) == 2
    assert "no module named no_such_module" in capsys.readouterr().err


def test_eval_bad_data_names_file_and_line(run_dir: Path, data: Path, capsys):
    lines = data.read_text().splitlines()
    lines[1] = '{"messages": [oops'
    data.write_text("\n".join(lines) + "\n")
    assert main(["eval", str(run_dir), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{data}:2" in err and "Traceback" not in err


def test_eval_missing_model_output(tmp_path: Path, data: Path, capsys):
    run = make_run(tmp_path / "run", tmp_path / "m", weights=False)
    assert main(["eval", str(run), "--data", str(data)]) == 2
    assert "has no model/" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "chat"])
def test_a_missing_model_path_is_named_before_anything_loads(tmp_path, data, command, capsys):
    missing = str(tmp_path / "no-such-run")
    extra = ["--data", str(data)] if command == "eval" else ["--prompt", "hi"]
    assert main([command, missing, *extra]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {missing}: no such run directory, model directory or .gguf")
    assert "Repo id" not in line  # not the hub client's complaint about the path's characters


def test_chat_one_shot_streams_the_reply(run_dir: Path, capsys):
    argv = ["chat", str(run_dir), "--prompt", "hello <there>", "--max-new-tokens", "6"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("\n") and captured.out.strip()
    assert "error" not in captured.err


def test_streamed_text_is_the_reply(run_dir: Path):
    loaded = load_for_inference(str(run_dir))
    out = io.StringIO()
    answer = one_shot(loaded, "alpha beta", max_new_tokens=6, out=out)
    assert out.getvalue().strip() == answer and answer


def test_inference_weights_keep_autocasts_cache(run_dir: Path):
    """autocast caches its bf16 cast of a weight for the whole generate() call only when the
    weight requires grad; a frozen one is cast again for every token. Freezing the inference
    model (tried in session 20) made a 200-token chat reply 26-28 s instead of 18-20 s: the tied
    output head, which frozen.match leaves fp32, was cast every token."""
    loaded = load_for_inference(str(run_dir))
    assert all(p.requires_grad for p in loaded.model.parameters())


def test_repl_keeps_history_resets_and_exits(run_dir: Path):
    loaded = load_for_inference(str(run_dir))
    inp = io.StringIO("first\n\nsecond\n/reset\nthird\n/exit\nnever read\n")
    out, err = io.StringIO(), io.StringIO()
    repl(loaded, 4, 0.0, "Be brief.", inp, out, err)
    assert len([line for line in out.getvalue().split("\n") if line]) >= 1
    assert "conversation forgotten" in err.getvalue()
    assert inp.readline() == "never read\n"  # stopped at /exit


def test_chat_drops_old_turns_to_fit_the_context(run_dir: Path):
    loaded = load_for_inference(str(run_dir))
    loaded.model.config.max_position_embeddings = 60
    convo = Conversation(None, [])
    for i in range(4):
        convo.turns += [
            {"role": "user", "content": f"question {i} " * 5},
            {"role": "assistant", "content": "answer " * 5},
        ]
    convo.turns.append({"role": "user", "content": "last"})
    reply(loaded, convo, 8, 0.0, io.StringIO())
    assert convo.turns[-1]["content"] == "last" and len(convo.turns) < 9
    convo = Conversation(None, [{"role": "user", "content": "word " * 200}])
    with pytest.raises(UserError, match="context"):
        reply(loaded, convo, 8, 0.0, io.StringIO())


def test_chat_with_a_run_uses_its_training_system_message(run_dir: Path, tmp_path, monkeypatch):
    import json
    import shutil

    import tunepilot.chat

    seen: list = []
    monkeypatch.setattr(tunepilot.chat, "one_shot", lambda *args: seen.append(args[4]) or "")
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    plan = json.loads((run / "plan.json").read_text())
    plan["data"]["system_prompt"] = "Answer as JSON."
    (run / "plan.json").write_text(json.dumps(plan))
    assert main(["chat", str(run), "--prompt", "hi"]) == 0
    assert main(["chat", str(run), "--prompt", "hi", "--system", "Be brief."]) == 0
    assert main(["chat", str(run), "--prompt", "hi", "--system", ""]) == 0
    assert main(["chat", str(run_dir), "--prompt", "hi"]) == 0  # recorded none
    assert seen == ["Answer as JSON.", "Be brief.", "", None]


def test_ctrl_c_at_a_terminal_stops_the_reply_not_the_chat(run_dir: Path, monkeypatch):
    import tunepilot.chat
    from tunepilot.errors import Terminated

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    loaded = load_for_inference(str(run_dir))
    calls: list[list[str]] = []

    def interrupted_once(loaded, convo, *args):
        calls.append([t["content"] for t in convo.turns])
        if len(calls) == 1:
            raise KeyboardInterrupt
        return "ok"

    monkeypatch.setattr(tunepilot.chat, "reply", interrupted_once)
    out, err = io.StringIO(), io.StringIO()
    repl(loaded, 4, 0.0, None, Terminal("ramble\nsecond\n/exit\n"), out, err)
    assert "reply stopped and forgotten" in err.getvalue()
    assert calls == [["ramble"], ["second"]]  # the stopped exchange is not carried on
    with pytest.raises(KeyboardInterrupt):  # piped input: Ctrl-C ends the program
        calls.clear()
        repl(loaded, 4, 0.0, None, io.StringIO("ramble\n"), out, err)

    def terminated(*args):
        raise Terminated()

    monkeypatch.setattr(tunepilot.chat, "reply", terminated)
    with pytest.raises(Terminated):  # SIGTERM always stops
        repl(loaded, 4, 0.0, None, Terminal("hi\n"), out, err)
