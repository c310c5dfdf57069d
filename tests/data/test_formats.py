"""detect_format / to_examples: each layout, and errors that name the row and the field."""

import json
from pathlib import Path

import pandas as pd
import pytest

from tunepilot.data.formats import Example, detect_format, to_examples
from tunepilot.data.sources import Row, read_rows
from tunepilot.errors import UserError

USER_ASSISTANT = ({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"})


def rows(*datas: dict) -> list[Row]:
    return [Row(data=d, where=f"train.jsonl:{i}") for i, d in enumerate(datas, start=1)]


def chat(*turns: tuple[str, object]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def problems_of(rs: list[Row], fmt: str) -> list[str]:
    with pytest.raises(UserError) as info:
        to_examples(rs, fmt)
    return info.value.problems


def load(tmp_path: Path, name: str, content: str) -> tuple[str, list[Example]]:
    """The full path a user's file takes: read, detect, normalise."""
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    rs = read_rows(path)
    fmt = detect_format(rs, str(path))
    return fmt, to_examples(rs, fmt)


# --- detection and normalisation, end to end ---------------------------------------------


def test_messages_jsonl(tmp_path: Path) -> None:
    row = chat(("system", "be brief"), ("user", "q"), ("assistant", "a"), ("user", "q2"))
    row["messages"].append({"role": "assistant", "content": "a2"})
    fmt, examples = load(tmp_path, "train.jsonl", json.dumps(row) + "\n")
    assert fmt == "messages"
    roles = [m["role"] for m in examples[0].messages]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert examples[0].text is None and examples[0].where.endswith("train.jsonl:1")


def test_sharegpt_roles_mapped(tmp_path: Path) -> None:
    row = {
        "conversations": [
            {"from": "system", "value": "s"},
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"},
            {"from": "user", "value": "q2"},
            {"from": "ChatGPT", "value": "a2"},
        ]
    }
    fmt, examples = load(tmp_path, "train.jsonl", json.dumps(row) + "\n")
    assert fmt == "sharegpt"
    assert examples[0].messages == (
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    )


def test_alpaca_json_array(tmp_path: Path) -> None:
    data = [
        {"instruction": "Translate", "input": "hola", "output": "hello"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Count", "output": "1 2 3"},
    ]
    fmt, examples = load(tmp_path, "train.json", json.dumps(data))
    assert fmt == "alpaca"
    assert examples[0].messages == (
        {"role": "user", "content": "Translate\n\nhola"},
        {"role": "assistant", "content": "hello"},
    )
    assert examples[1].messages[0]["content"] == "Say hi"
    assert examples[2].messages[0]["content"] == "Count"
    assert examples[2].where.endswith(":row 3")


def test_prompt_completion_csv(tmp_path: Path) -> None:
    fmt, examples = load(tmp_path, "train.csv", "prompt,completion\nq,a\n")
    assert fmt == "prompt_completion"
    assert examples[0].messages == USER_ASSISTANT


def test_text_parquet(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    pd.DataFrame({"text": ["one", "two"]}).to_parquet(path)
    rs = read_rows(path)
    assert detect_format(rs, str(path)) == "text"
    examples = to_examples(rs, "text")
    assert [e.text for e in examples] == ["one", "two"] and examples[0].messages is None


def test_messages_as_json_text_in_csv(tmp_path: Path) -> None:
    cell = json.dumps(list(USER_ASSISTANT)).replace('"', '""')
    fmt, examples = load(tmp_path, "train.csv", f'messages\n"{cell}"\n')
    assert fmt == "messages"
    assert examples[0].messages == USER_ASSISTANT


def test_saved_dataset_dir_sharegpt(tmp_path: Path) -> None:
    import datasets

    convo = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    datasets.Dataset.from_list([{"conversations": convo}]).save_to_disk(tmp_path / "ds")
    rs = read_rows(tmp_path / "ds")
    assert detect_format(rs, str(tmp_path / "ds")) == "sharegpt"
    assert to_examples(rs, "sharegpt")[0].messages == USER_ASSISTANT


def test_text_column_beside_alpaca_is_not_ambiguous() -> None:
    rs = rows({"instruction": "i", "input": "", "output": "o", "text": "### i\n### o"})
    assert detect_format(rs, "train.jsonl") == "alpaca"


# --- detection errors ---------------------------------------------------------------------


def test_csv_without_recognised_columns(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("question,answer\nq,a\n", encoding="utf-8")
    with pytest.raises(UserError) as info:
        detect_format(read_rows(path), str(path))
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}: no recognised columns (found: question, answer)")
    assert "instruction+output" in problem and "data.format" in problem


def test_two_structured_formats_are_ambiguous() -> None:
    rs = rows({"prompt": "p", "completion": "c", "instruction": "i", "output": "o"})
    with pytest.raises(UserError, match=r"train.jsonl:1: .*alpaca, prompt_completion"):
        detect_format(rs, "train.jsonl")


def test_mixed_formats() -> None:
    rs = rows({"text": "t"}, {"prompt": "p", "completion": "c"})
    with pytest.raises(UserError, match=r"rows mix formats .*train.jsonl:2"):
        detect_format(rs, "train.jsonl")


# --- row errors ---------------------------------------------------------------------------


def test_unknown_role() -> None:
    rs = rows(chat(("user", "q"), ("assistant", "a")), chat(("user", "q"), ("robot", "a")))
    (problem,) = problems_of(rs, "messages")
    assert problem.startswith("train.jsonl:2: messages[1].role 'robot'")
    assert "system, user, assistant" in problem


def test_unknown_sharegpt_role() -> None:
    rs = rows({"conversations": [{"from": "human", "value": "q"}, {"from": "x", "value": "a"}]})
    (problem,) = problems_of(rs, "sharegpt")
    assert "conversations[1].from 'x'" in problem and "gpt" in problem


def test_missing_assistant_turn() -> None:
    (problem,) = problems_of(rows(chat(("system", "s"), ("user", "q"))), "messages")
    assert problem.startswith("train.jsonl:1: no assistant turn")


def test_every_bad_row_is_reported() -> None:
    good = chat(("user", "q"), ("assistant", "a"))
    rs = rows(
        good,
        chat(("user", "q")),  # no reply
        chat(("user", "q"), ("assistant", 5)),  # content not a string
        {"messages": []},  # empty conversation
        chat(("user", "q"), ("system", "s"), ("assistant", "a")),  # system not first
        chat(("assistant", "a"), ("user", "q")),  # reply before any question
        {"messages": "not json"},  # a string that is not a JSON list
        {"messages": {"role": "user"}},  # not a list
        chat(("user", "q"), ("assistant", "  ")),  # nothing to learn
        good,
    )
    problems = problems_of(rs, "messages")
    assert [p.split(":")[1] for p in problems] == ["2", "3", "4", "5", "6", "7", "8", "9"]
    assert "messages[1].content' must be a string, got a number" in problems[1]
    assert "empty conversation" in problems[2]
    assert "messages[1] is a system message" in problems[3]
    assert "no user turn before it" in problems[4]
    assert "not valid JSON" in problems[5]
    assert "got an object" in problems[6]
    assert "empty" in problems[7]


def test_nothing_to_learn_in_simple_formats() -> None:
    assert "empty 'text'" in problems_of(rows({"text": " \n"}), "text")[0]
    assert "empty 'output'" in problems_of(rows({"instruction": "i", "output": ""}), "alpaca")[0]
    (problem,) = problems_of(rows({"prompt": "p", "completion": ""}), "prompt_completion")
    assert "empty 'completion'" in problem


def test_missing_field_in_some_rows() -> None:
    rs = rows({"instruction": "i", "output": "o"}, {"instruction": "i", "output": None})
    (problem,) = problems_of(rs, "alpaca")
    assert problem.startswith("train.jsonl:2: missing field 'output'")


def test_explicit_format_that_does_not_match() -> None:
    rs = rows(chat(("user", "q"), ("assistant", "a")), chat(("user", "q"), ("assistant", "a")))
    (problem,) = problems_of(rs, "alpaca")
    assert problem.startswith("train.jsonl:1: missing field 'instruction'")
    assert "found: messages" in problem


def test_unknown_format_name() -> None:
    (problem,) = problems_of(rows({"text": "t"}), "chatml")
    assert "'chatml'" in problem and "prompt_completion" in problem


def test_bad_row_in_file_names_physical_line(tmp_path: Path) -> None:
    good = json.dumps(chat(("user", "q"), ("assistant", "a")))
    bad = json.dumps(chat(("user", "q"), ("tool", "a")))
    path = tmp_path / "train.jsonl"
    path.write_text(f"{good}\n\n{bad}\n", encoding="utf-8")
    rs = read_rows(path)
    (problem,) = problems_of(rs, detect_format(rs, str(path)))
    assert problem.startswith(f"{path}:3: messages[1].role 'tool'")
