"""read_rows: every supported input, and a located, actionable error for every bad one."""

import json
from pathlib import Path

import pandas as pd
import pytest

from tunepilot.data.sources import MAX_PROBLEMS, read_rows
from tunepilot.errors import UserError

CHAT = {
    "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
}


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def jsonl(*objs: object) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


def error_of(path: Path) -> list[str]:
    with pytest.raises(UserError) as info:
        read_rows(path)
    return info.value.problems


# --- formats that load --------------------------------------------------------------------


def test_jsonl_rows_and_line_numbers(tmp_path: Path) -> None:
    path = write(tmp_path, "train.jsonl", jsonl(CHAT, {"text": "x"}))
    rows = read_rows(path)
    assert [r.where for r in rows] == [f"{path}:1", f"{path}:2"]
    assert rows[0].data["messages"][1] == {"role": "assistant", "content": "hello"}
    assert rows[1].data["text"] == "x"


def test_ndjson_and_str_path(tmp_path: Path) -> None:
    path = write(tmp_path, "train.ndjson", jsonl({"text": "a"}))
    rows = read_rows(str(path))
    assert rows[0].data == {"text": "a"}
    assert rows[0].where == f"{path}:1"


def test_blank_lines_skipped_but_counted(tmp_path: Path) -> None:
    path = write(tmp_path, "train.jsonl", '\n{"text": "a"}\n   \n\n{"text": "b"}\n\n')
    rows = read_rows(path)
    assert [r.data["text"] for r in rows] == ["a", "b"]
    assert [r.where for r in rows] == [f"{path}:2", f"{path}:5"]


def test_bom_and_crlf_tolerated_in_jsonl(tmp_path: Path) -> None:
    text = '{"text": "a"}\r\n\r\n{"text": "b"}\r\n'
    path = write(tmp_path, "train.jsonl", b"\xef\xbb\xbf" + text.encode())
    rows = read_rows(path)
    assert [r.data["text"] for r in rows] == ["a", "b"]
    assert rows[1].where.endswith(":3")


def test_json_array(tmp_path: Path) -> None:
    path = write(tmp_path, "train.json", json.dumps([CHAT, CHAT, CHAT], indent=2))
    rows = read_rows(path)
    assert len(rows) == 3
    assert rows[2].where == f"{path}:row 3"


def test_jsonl_content_in_json_file(tmp_path: Path) -> None:
    path = write(tmp_path, "train.json", jsonl({"text": "a"}) + "\n" + jsonl({"text": "b"}))
    rows = read_rows(path)
    assert [r.where for r in rows] == [f"{path}:1", f"{path}:3"]


def test_rows_get_every_column(tmp_path: Path) -> None:
    # Going through datasets gives JSON rows the same shape as CSV/Parquet rows.
    path = write(tmp_path, "train.jsonl", jsonl({"text": "a"}, {"text": "b", "id": 7}))
    assert read_rows(path)[0].data == {"text": "a", "id": None}


def test_mixed_types_keep_raw_values(tmp_path: Path) -> None:
    # Arrow cannot hold "string here, number there"; the raw values must survive for validation.
    path = write(tmp_path, "train.jsonl", jsonl({"text": "a"}, {"text": 5}))
    assert [r.data["text"] for r in read_rows(path)] == ["a", 5]


def test_csv_values_stay_text(tmp_path: Path) -> None:
    path = write(tmp_path, "train.csv", 'prompt,completion\n007,NA\n"a, b",""\n')
    rows = read_rows(path)
    assert rows[0].data == {"prompt": "007", "completion": "NA"}
    assert rows[1].data == {"prompt": "a, b", "completion": ""}
    assert [r.where for r in rows] == [f"{path}:row 1", f"{path}:row 2"]


def test_csv_bom_crlf_and_blank_lines(tmp_path: Path) -> None:
    text = 'text,id\r\n"line one\r\nline two",1\r\n\r\nplain,2\r\n'
    path = write(tmp_path, "train.csv", b"\xef\xbb\xbf" + text.encode())
    rows = read_rows(path)
    assert list(rows[0].data) == ["text", "id"]  # no BOM glued to the first column name
    assert [r.data["id"] for r in rows] == ["1", "2"]
    assert rows[0].data["text"].splitlines() == ["line one", "line two"]


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "train[1].parquet"  # glob characters in the name must not matter
    pd.DataFrame({"prompt": ["p1", "p2"], "completion": ["c1", "c2"]}).to_parquet(path)
    rows = read_rows(path)
    assert [r.data["completion"] for r in rows] == ["c1", "c2"]
    assert rows[1].where == f"{path}:row 2"


def test_nothing_written_next_to_the_data(tmp_path: Path) -> None:
    write(tmp_path, "train.csv", "text\na\n")
    pd.DataFrame({"text": ["a"]}).to_parquet(tmp_path / "train.parquet")
    before = sorted(p.name for p in tmp_path.iterdir())
    read_rows(tmp_path / "train.csv")
    read_rows(tmp_path / "train.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_saved_dataset_dir(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}]).save_to_disk(tmp_path / "ds")
    rows = read_rows(tmp_path / "ds")
    assert [r.data["text"] for r in rows] == ["a", "b"]
    assert rows[1].where == f"{tmp_path / 'ds'}:row 2"


def test_saved_dataset_dict_uses_train(tmp_path: Path) -> None:
    import datasets

    ds = datasets.DatasetDict(
        train=datasets.Dataset.from_list([{"text": "t"}]),
        test=datasets.Dataset.from_list([{"text": "e"}]),
    )
    ds.save_to_disk(tmp_path / "dd")
    assert [r.data["text"] for r in read_rows(tmp_path / "dd")] == ["t"]


def test_saved_dataset_dict_without_train(tmp_path: Path) -> None:
    import datasets

    ds = datasets.DatasetDict(validation=datasets.Dataset.from_list([{"text": "v"}]))
    ds.save_to_disk(tmp_path / "dd")
    (problem,) = error_of(tmp_path / "dd")
    assert "'train'" in problem and "validation" in problem


# --- errors -------------------------------------------------------------------------------


def test_malformed_json_names_line_3(tmp_path: Path) -> None:
    path = write(tmp_path, "train.jsonl", jsonl(CHAT, CHAT) + '{"text": "a" "b"}\n')
    (problem,) = error_of(path)
    assert problem.startswith(f"{path}:3: invalid JSON")
    assert "delimiter" in problem and "fix or remove the line" in problem


def test_non_object_line(tmp_path: Path) -> None:
    path = write(tmp_path, "train.jsonl", jsonl(CHAT) + "[1, 2]\n42\n")
    problems = error_of(path)
    assert problems[0].startswith(f"{path}:2:") and "got an array" in problems[0]
    assert problems[1].startswith(f"{path}:3:") and "got a number" in problems[1]


def test_problems_are_capped(tmp_path: Path) -> None:
    path = write(tmp_path, "train.jsonl", "nope\n" * (MAX_PROBLEMS + 5))
    problems = error_of(path)
    assert len(problems) == MAX_PROBLEMS + 1
    assert problems[-1] == "... and 5 more problems like these"


@pytest.mark.parametrize("name", ["train.jsonl", "train.csv", "train.json", "train.parquet"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    (problem,) = error_of(write(tmp_path, name, ""))
    assert name in problem and "empty" in problem


def test_only_blank_lines(tmp_path: Path) -> None:
    (problem,) = error_of(write(tmp_path, "train.jsonl", "\n  \r\n\n"))
    assert "train.jsonl" in problem and "no rows" in problem


def test_csv_header_only(tmp_path: Path) -> None:
    (problem,) = error_of(write(tmp_path, "train.csv", "prompt,completion\n"))
    assert "train.csv" in problem and "no rows" in problem


@pytest.mark.parametrize(("sep", "word"), [(";", "semicolon"), ("\t", "tab")])
def test_csv_with_another_separator_says_so(tmp_path: Path, sep: str, word: str) -> None:
    text = f"prompt{sep}completion\nq1{sep}a1\nq2{sep}a2\n"
    (problem,) = error_of(write(tmp_path, "train.csv", text))
    assert problem.startswith(f"{tmp_path / 'train.csv'}:1: the header is one field")
    assert f"looks {word}-separated" in problem and "re-save it with commas" in problem


def test_undecodable_bytes_name_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "train.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    (problem,) = error_of(path)
    assert problem.startswith(f"{path}:2: not valid UTF-8") and "0xe9" in problem


def test_undecodable_bytes_in_csv(tmp_path: Path) -> None:
    path = write(tmp_path, "train.csv", b"text\nok\nbad \xff\n")
    (problem,) = error_of(path)
    assert problem.startswith(f"{path}:3: not valid UTF-8")


def test_missing_file(tmp_path: Path) -> None:
    (problem,) = error_of(tmp_path / "nope.jsonl")
    assert "nope.jsonl: no such file" in problem and "data.train" in problem


def test_unknown_extension(tmp_path: Path) -> None:
    (problem,) = error_of(write(tmp_path, "train.txt", "hello\n"))
    assert "train.txt" in problem and ".txt" in problem and ".jsonl" in problem


def test_plain_directory(tmp_path: Path) -> None:
    (tmp_path / "stuff").mkdir()
    (problem,) = error_of(tmp_path / "stuff")
    assert "stuff" in problem and "not a saved dataset" in problem


def test_unreadable_parquet(tmp_path: Path) -> None:
    (problem,) = error_of(write(tmp_path, "train.parquet", b"this is not parquet at all"))
    assert "train.parquet" in problem and "not a readable Parquet file" in problem


def test_json_array_with_non_objects(tmp_path: Path) -> None:
    path = write(tmp_path, "train.json", json.dumps([CHAT, "oops", CHAT]))
    (problem,) = error_of(path)
    assert problem.startswith(f"{path}:row 2:") and "got a string" in problem


def test_malformed_json_array_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "train.json", '[\n  {"text": "a"},\n  {"text": }\n]\n')
    (problem,) = error_of(path)
    assert problem.startswith(f"{path}:3: invalid JSON")


def test_single_json_object_file(tmp_path: Path) -> None:
    path = write(tmp_path, "train.json", json.dumps({"data": [CHAT]}, indent=2))
    (problem,) = error_of(path)
    assert "single JSON object" in problem


def test_csv_wrong_field_count(tmp_path: Path) -> None:
    path = write(tmp_path, "train.csv", "prompt,completion\na,b\nc,d,e\n")
    (problem,) = error_of(path)
    assert problem.startswith(f"{path}:3: 3 fields but the header has 2")
