"""Recognise the layout of training rows and normalise them to chat messages or plain text.

Every problem is reported against the row it came from ("data/train.jsonl:17: ..."), and all bad
rows are listed (up to a cap), so one run shows the user everything to fix.
"""

import json
from dataclasses import dataclass
from typing import Any

from tunepilot.data.sources import Row, json_kind, raise_problems
from tunepilot.errors import UserError

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": str}
FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
ROLES = ("system", "user", "assistant")

# The columns that identify each format (all must be present and non-null).
COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
_EXPECTED = " | ".join("+".join(cols) for cols in COLUMNS.values())
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bot": "assistant",
    "system": "system",
}
_CHAT_ROLES = {role: role for role in ROLES}
# Enough rows to catch a file that mixes formats early, few enough to stay instant.
_DETECT_ROWS = 20


@dataclass(frozen=True)
class Example:
    """One training example: chat ``messages`` (chat-like formats) or ``text`` (text format)."""

    messages: tuple[Message, ...] | None
    text: str | None
    where: str  # copied from Row.where


def detect_format(rows: list[Row], path: str) -> str:
    """Pick the format ("messages", "sharegpt", ...) from the columns of the first rows.

    A ``text`` column next to a structured format's columns does not make the rows ambiguous:
    it is almost always a pre-rendered copy of them (e.g. the original Alpaca release), so the
    structured format wins. Two structured formats at once, rows that mix formats, or no
    recognised columns raise UserError.
    """
    if not rows:
        raise UserError(f"{path}: no rows; add training examples to it")
    first_seen: dict[str, str] = {}  # format -> where of the first row in that format
    for row in rows[:_DETECT_ROWS]:
        matches = _matching_formats(row.data)
        if len(matches) > 1:
            raise UserError(
                f"{row.where}: columns fit more than one format ({', '.join(matches)}); "
                "set data.format to the one you mean"
            )
        if matches:
            first_seen.setdefault(matches[0], row.where)
    if len(first_seen) > 1:
        seen = ", ".join(f"{fmt} at {where}" for fmt, where in first_seen.items())
        raise UserError(f"{path}: rows mix formats ({seen}); use one format per file")
    if not first_seen:
        found = ", ".join(dict.fromkeys(k for row in rows[:_DETECT_ROWS] for k in row.data))
        raise UserError(
            f"{path}: no recognised columns (found: {found or 'none'}); expected one of: "
            f"{_EXPECTED}; set data.format or rename columns"
        )
    return next(iter(first_seen))


def to_examples(rows: list[Row], fmt: str) -> list[Example]:
    """Validate every row against ``fmt`` and normalise it; UserError lists each bad row."""
    if fmt not in FORMATS:
        allowed = ", ".join(FORMATS)
        raise UserError(f"data.format: unknown format {fmt!r}; use auto or one of: {allowed}")
    required = COLUMNS[fmt]
    if rows and not any(_has_columns(row.data, required) for row in rows):
        # The whole file is in another layout: one message beats a thousand identical ones.
        first = rows[0]
        missing = next(c for c in required if first.data.get(c) is None)
        found = ", ".join(first.data) or "none"
        raise UserError(
            f"{first.where}: missing field {missing!r} required by data.format {fmt} "
            f"(found: {found}); set data.format to match the data (or auto)"
        )
    examples: list[Example] = []
    problems: list[str] = []
    for row in rows:
        result = _to_example(row, fmt)
        if isinstance(result, str):
            problems.append(f"{row.where}: {result}")
        else:
            examples.append(result)
    raise_problems(problems)
    return examples


def common_system(examples: list[Example]) -> str | None:
    """The system message every example opens with, if they share one: a model trained under it
    answers as trained only under it, so chatting with the run uses it by default."""
    first = {
        ex.messages[0]["content"] if ex.messages and ex.messages[0]["role"] == "system" else None
        for ex in examples
    }
    return first.pop() if len(first) == 1 else None


def _has_columns(data: dict[str, Any], columns: tuple[str, ...]) -> bool:
    # None counts as absent: CSV/Parquet/arrow give every row every column, filling gaps with null.
    return all(data.get(c) is not None for c in columns)


def _matching_formats(data: dict[str, Any]) -> list[str]:
    matches = [fmt for fmt, cols in COLUMNS.items() if _has_columns(data, cols)]
    if len(matches) > 1 and "text" in matches:
        matches.remove("text")
    return matches


def _to_example(row: Row, fmt: str) -> Example | str:
    """Normalise one row, or return what is wrong with it (without the location prefix)."""
    data = row.data
    if fmt == "text":
        text = data.get("text")
        if not isinstance(text, str):
            return _bad_type("text", text)
        if not text.strip():
            return "empty 'text', nothing to learn; fill it in or remove the row"
        return Example(messages=None, text=text, where=row.where)
    if fmt == "messages":
        turns = _chat_turns(data, "messages", "role", "content", _CHAT_ROLES)
    elif fmt == "sharegpt":
        turns = _chat_turns(data, "conversations", "from", "value", _SHAREGPT_ROLES)
    elif fmt == "alpaca":
        turns = _alpaca_turns(data)
    else:
        turns = _prompt_completion_turns(data)
    if isinstance(turns, str):
        return turns
    problem = _check_turns(turns, "conversations" if fmt == "sharegpt" else "messages")
    if problem:
        return problem
    return Example(messages=tuple(turns), text=None, where=row.where)


def _chat_turns(
    data: dict[str, Any], field: str, role_key: str, content_key: str, roles: dict[str, str]
) -> list[Message] | str:
    """Read a list of {role_key, content_key} objects, mapping role names through ``roles``."""
    value = data.get(field)
    if value is None:
        return f"missing field {field!r}; add it or set data.format to match the row"
    shape = f'a JSON list of {{"{role_key}": ..., "{content_key}": ...}} objects'
    if isinstance(value, str):
        # CSV cells can only hold text, so conversations arrive as JSON strings there.
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            problem = f"{e.msg} at column {e.colno}"
            return f"{field!r} is text but not valid JSON ({problem}); make it {shape}"
    if not isinstance(value, list):
        return f"{field!r} must be {shape}, got {json_kind(value)}"
    if not value:
        return f"{field!r} is an empty conversation; add turns or remove the row"
    turns: list[Message] = []
    for i, item in enumerate(value):
        at = f"{field}[{i}]"
        if not isinstance(item, dict):
            keys = f"{role_key!r} and {content_key!r}"
            return f"{at} must be an object with {keys}, got {json_kind(item)}"
        raw_role, content = item.get(role_key), item.get(content_key)
        if not isinstance(raw_role, str):
            return _bad_type(f"{at}.{role_key}", raw_role)
        role = roles.get(raw_role.strip().lower())
        if role is None:
            allowed = ", ".join(roles)
            return f"{at}.{role_key} {raw_role!r} is not a known role; use one of: {allowed}"
        if not isinstance(content, str):
            return _bad_type(f"{at}.{content_key}", content)
        turns.append({"role": role, "content": content})
    return turns


def _check_turns(turns: list[Message], field: str) -> str | None:
    """Lenient conversation checks: only what would make training wrong or pointless."""
    for i, turn in enumerate(turns):
        if turn["role"] == "system" and i > 0:
            return (
                f"{field}[{i}] is a system message but only the first message may be system; "
                "move it to the front or merge it"
            )
    first_reply = next((i for i, t in enumerate(turns) if t["role"] == "assistant"), None)
    if first_reply is None:
        return f"no assistant turn in {field!r}, nothing to learn; add the reply or remove the row"
    if not any(t["role"] == "user" for t in turns[:first_reply]):
        return (
            f"{field}[{first_reply}] is an assistant turn with no user turn before it; "
            "start the conversation with a user message"
        )
    if not any(t["role"] == "assistant" and t["content"].strip() for t in turns):
        return (
            f"every assistant turn in {field!r} is empty, nothing to learn; "
            "fill in the reply or remove the row"
        )
    return None


def _alpaca_turns(data: dict[str, Any]) -> list[Message] | str:
    instruction, extra, output = data.get("instruction"), data.get("input"), data.get("output")
    if not isinstance(instruction, str):
        return _bad_type("instruction", instruction)
    if extra is not None and not isinstance(extra, str):
        return _bad_type("input", extra)
    if not isinstance(output, str):
        return _bad_type("output", output)
    if not output.strip():
        return "empty 'output', nothing to learn; fill it in or remove the row"
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _prompt_completion_turns(data: dict[str, Any]) -> list[Message] | str:
    prompt, completion = data.get("prompt"), data.get("completion")
    if not isinstance(prompt, str):
        return _bad_type("prompt", prompt)
    if not isinstance(completion, str):
        return _bad_type("completion", completion)
    if not completion.strip():
        return "empty 'completion', nothing to learn; fill it in or remove the row"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def _bad_type(field: str, value: Any) -> str:
    if value is None:
        return f"missing field {field!r}; add it to the row"
    return f"{field!r} must be a string, got {json_kind(value)}; fix the value"
