"""Read a training data file (or saved dataset) into rows that remember where they came from.

Loading goes through Hugging Face ``datasets``, but text formats are pre-scanned here first: the
``datasets``/pyarrow loaders report problems as byte offsets or bare exceptions, while users need
"file:line: what is wrong; what to do".
"""

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunepilot.errors import UserError

MAX_PROBLEMS = 10
SUPPORTED = ".jsonl, .ndjson, .json, .csv, .parquet, or a directory written by save_to_disk"


@dataclass(frozen=True)
class Row:
    """One record as read from the file, plus where it came from (for error messages)."""

    data: dict[str, Any]
    where: str  # "path:LINE" for JSONL (physical line), "path:row N" otherwise; both 1-based


def raise_problems(problems: list[str]) -> None:
    """Raise one UserError listing the first MAX_PROBLEMS problems; do nothing if there are none.

    Showing every bad line of a broken 50k-row file helps nobody, so the rest become a count.
    """
    if not problems:
        return
    shown = problems[:MAX_PROBLEMS]
    if len(problems) > MAX_PROBLEMS:
        shown.append(f"... and {len(problems) - MAX_PROBLEMS} more problems like these")
    raise UserError(*shown)


def json_kind(value: Any) -> str:
    """Name a parsed JSON value the way a user would describe it ("an array", "a number")."""
    kinds = [(bool, "true/false"), (dict, "an object"), (list, "an array"), (str, "a string")]
    kinds.append((int | float, "a number"))  # after bool: True is an int too
    return next((kind for t, kind in kinds if isinstance(value, t)), "null")


def read_rows(path: str | Path) -> list[Row]:
    """Read every row of a .jsonl/.ndjson/.json/.csv/.parquet file or a saved ``datasets`` dir.

    Raises UserError (one problem per line, naming file and line/row) for anything unreadable.
    Never returns an empty list.
    """
    name = str(path)
    p = Path(path)
    if not p.exists():
        raise UserError(f"{name}: no such file; check data.train/data.eval")
    if p.is_dir():
        return _read_saved_dataset(p, name)
    reader = _READERS.get(p.suffix.lower())
    if reader is None:
        ext = p.suffix or "(no extension)"
        raise UserError(f"{name}: unsupported file type {ext}; use {SUPPORTED}")
    if p.stat().st_size == 0:
        raise UserError(f"{name}: file is empty; add training examples to it")
    return reader(p, name)


def _read_text(p: Path, name: str) -> str:
    """Decode the file as UTF-8, dropping a leading BOM (Excel and Notepad like to add one)."""
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    problems = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        try:
            line.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            problems.append(
                f"{name}:{lineno}: not valid UTF-8 (byte 0x{line[e.start]:02x} at column "
                f"{e.start + 1}); re-save the file as UTF-8"
            )
    raise_problems(problems)
    # Not reached in practice: a byte 0x0A never occurs inside a multi-byte UTF-8 sequence.
    raise UserError(f"{name}: not valid UTF-8; re-save the file as UTF-8")


def _parse_jsonl(text: str, name: str) -> list[Row]:
    """Parse one JSON object per line; blank lines are skipped but still count for numbering."""
    objects: list[dict[str, Any]] = []
    wheres: list[str] = []
    problems: list[str] = []
    # Split on "\n" only: str.splitlines() also breaks on U+2028 and friends, which may legally
    # appear unescaped inside JSON strings. A trailing "\r" (CRLF files) is JSON whitespace.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(
                f"{name}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                "fix or remove the line"
            )
            continue
        if not isinstance(value, dict):
            problems.append(
                f"{name}:{lineno}: expected a JSON object, got {json_kind(value)}; "
                "put one {...} object per line"
            )
            continue
        objects.append(value)
        wheres.append(f"{name}:{lineno}")
    raise_problems(problems)
    return _rows(_normalise(objects), name, wheres)


def _read_jsonl(p: Path, name: str) -> list[Row]:
    return _parse_jsonl(_read_text(p, name), name)


def _read_json(p: Path, name: str) -> list[Row]:
    """A .json file holds either one JSON array of objects or, quite often, JSONL content."""
    text = _read_text(p, name)
    if text.lstrip().startswith("["):
        try:
            return _array_rows(json.loads(text), name)
        except json.JSONDecodeError as e:
            # "Extra data" after a complete first array means one array per line: treat it as
            # JSONL so each line gets its own "expected a JSON object" message.
            if e.msg != "Extra data":
                raise UserError(
                    f"{name}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}); fix the file"
                ) from None
    try:
        return _parse_jsonl(text, name)
    except UserError:
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict):
            raise UserError(
                f"{name}: holds a single JSON object, not a list of rows; use a JSON array of "
                "objects or one object per line (JSONL)"
            ) from None
        raise


def _array_rows(value: list[Any], name: str) -> list[Row]:
    problems = [
        f"{name}:row {i}: expected a JSON object, got {json_kind(item)}; "
        "make every array item an object"
        for i, item in enumerate(value, start=1)
        if not isinstance(item, dict)
    ]
    raise_problems(problems)
    return _rows(_normalise(value), name)


def _scan_csv(text: str, name: str) -> list[str]:
    """Check the CSV structure line by line and return the column names."""
    # Long chat transcripts easily exceed the csv module's 128 KiB default field limit.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    header_line = 0
    n_rows = 0
    problems: list[str] = []
    prev_end = 0
    try:
        for record in reader:
            start, prev_end = prev_end + 1, reader.line_num
            if not record or (len(record) == 1 and not record[0].strip()):
                continue  # blank line: pandas skips these too, so row numbers stay in step
            if header is None:
                header, header_line = record, start
                continue
            n_rows += 1
            if len(record) != len(header):
                problems.append(
                    f"{name}:{start}: {len(record)} fields but the header has {len(header)}; "
                    'quote values that contain commas ("a, b")'
                )
    except csv.Error as e:
        problems.append(f"{name}:{reader.line_num}: unreadable CSV ({e}); check the quoting")
    raise_problems(problems)
    if header is None:
        raise UserError(f"{name}: no rows (only blank lines); add a header and training examples")
    if n_rows == 0:
        raise UserError(f"{name}: no rows (only a header); add training examples below it")
    if len(header) == 1:
        seps = ((";", "semicolon"), ("\t", "tab"))
        sep = next((word for char, word in seps if char in header[0]), "")
        if sep:  # e.g. a European spreadsheet's export: the whole header is one field
            raise UserError(
                f"{name}:{header_line}: the header is one field, {header[0]!r}: the file "
                f"looks {sep}-separated, and CSV here means commas; re-save it with commas "
                "(pandas: df.to_csv(path, index=False)) or as JSONL"
            )
    # Same names pandas would invent, so users recognise them (e.g. an exported index column).
    columns = [col.strip() or f"Unnamed: {i}" for i, col in enumerate(header)]
    dupes = sorted({c for c in columns if columns.count(c) > 1})
    if dupes:
        raise UserError(
            f"{name}:{header_line}: duplicate column {dupes[0]!r} in the header; rename one of them"
        )
    return columns


def _read_csv(p: Path, name: str) -> list[Row]:
    import datasets

    text = _read_text(p, name)
    columns = _scan_csv(text, name)
    data = _load_dataset(
        "csv",
        name,
        # A BOM-free copy: pandas would otherwise glue the BOM to the first column name.
        lambda dest: dest.write_text(text, encoding="utf-8", newline=""),
        # Everything as text: "007" must stay "007", and "NA"/"None" are answers, not nulls.
        column_names=columns,
        header=0,
        keep_default_na=False,
        features=datasets.Features({c: datasets.Value("string") for c in columns}),
    )
    return _rows(data, name)


def _read_parquet(p: Path, name: str) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        pq.ParquetFile(p).close()
    except Exception as e:
        raise UserError(
            f"{name}: not a readable Parquet file ({_first_line(e)}); re-export it, e.g. with "
            "pandas DataFrame.to_parquet"
        ) from None
    return _rows(_load_dataset("parquet", name, lambda dest: _link_or_copy(p, dest)), name)


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        dest.symlink_to(src.resolve())
    except OSError:  # e.g. Windows without symlink rights
        shutil.copyfile(src, dest)


def _read_saved_dataset(p: Path, name: str) -> list[Row]:
    """Load a directory written by Dataset.save_to_disk (or a DatasetDict's "train" split)."""
    if not ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
        raise UserError(
            f"{name}: is a directory but not a saved dataset (no state.json or dataset_dict.json);"
            f" point data.train/data.eval at a {SUPPORTED}"
        )
    import datasets

    with _quiet_datasets():
        try:
            loaded = datasets.load_from_disk(str(p))
        except Exception as e:
            raise UserError(
                f"{name}: could not load the saved dataset ({_first_line(e)}); "
                "re-save it with save_to_disk"
            ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            splits = ", ".join(loaded) or "none"
            example = os.path.join(name, next(iter(loaded), "SPLIT"))
            raise UserError(
                f"{name}: saved DatasetDict has no 'train' split (splits: {splits}); point the "
                f"path at one split's folder, e.g. {example}"
            )
        loaded = loaded["train"]
    return _rows(loaded.to_list(), name)


def _load_dataset(
    builder: str, name: str, stage: Callable[[Path], None], **kwargs: Any
) -> list[dict[str, Any]]:
    """Run a packaged ``datasets`` builder on a staged copy of the file in a scratch folder.

    The scratch folder also holds datasets' cache, so nothing is written next to the user's
    data, and the fixed file name dodges datasets treating data_files as glob patterns (a file
    called "train[1].csv" would otherwise match nothing).
    """
    import datasets

    with (
        tempfile.TemporaryDirectory(prefix="tunepilot-data-", ignore_cleanup_errors=True) as tmp,
        _quiet_datasets(),
    ):
        staged = Path(tmp) / f"data.{builder}"
        stage(staged)
        try:
            ds = datasets.load_dataset(
                builder,
                data_files=str(staged),
                split="train",
                cache_dir=tmp,
                keep_in_memory=True,  # no memory-mapped handles left open on the scratch dir
                **kwargs,
            )
        except Exception as e:
            raise UserError(
                f"{name}: could not read the {builder} file ({_first_line(e)}); "
                "check that it is a valid, complete file"
            ) from None
        return ds.to_list()


def _normalise(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Round-trip parsed JSON through ``datasets`` so every row has every column (absent = None).

    That matches what CSV/Parquet rows look like. Arrow cannot hold every JSON shape (e.g. a field
    that is a string in one row and a number in another); the raw parse is then kept as is, and
    the format checks report the odd field with its line number.
    """
    import datasets

    with _quiet_datasets():
        try:
            # Not Dataset.from_list: it takes the columns from the first row only, silently
            # dropping any field that first appears later.
            columns = dict.fromkeys(key for obj in objects for key in obj)
            table = {key: [obj.get(key) for obj in objects] for key in columns}
            return datasets.Dataset.from_dict(table).to_list()
        except Exception:
            return objects


def _rows(data: list[dict[str, Any]], name: str, wheres: list[str] | None = None) -> list[Row]:
    """Pair records with their locations ("path:row N" unless given); no records is an error."""
    if not data:
        raise UserError(f"{name}: no rows; add training examples to it")
    wheres = wheres or [f"{name}:row {i}" for i in range(1, len(data) + 1)]
    return [Row(data=d, where=w) for d, w in zip(data, wheres, strict=True)]


def _first_line(e: BaseException) -> str:
    """The most specific message in an exception chain (datasets wraps the real error)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence datasets' progress bars and info logging, then restore the caller's settings."""
    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.enable_progress_bars()


# `datasets` is imported lazily inside the readers: it takes ~0.5 s, and `tunepilot --help` or a
# config check should not pay for it.
_READERS: dict[str, Callable[[Path, str], list[Row]]] = {
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}
