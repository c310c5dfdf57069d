"""Examples -> token ids with a loss mask built from the chat template's own text.

The mask says which tokens the model is trained to predict: every assistant turn, including the
template's end-of-turn token (so the model learns to stop), and nothing from the system or user
turns. It is built from character spans of the rendered template, never by searching for token
ids: a pad token equal to EOS must not hide the EOS the model has to learn.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tunepilot.data.formats import Example
from tunepilot.errors import UserError

#: used only when a tokenizer ships no chat template (base models); shown in the plan
FALLBACK_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Response:\\n' + m['content'] + eos_token + '\\n\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    #: loss_mask[i] is True when token i is a training target (predicted from position i - 1)
    loss_mask: list[bool]
    #: tokens before the final assistant answer: the prompt for generation-based evaluation
    prompt_length: int
    #: the final assistant answer (reference for exact match); None for plain text
    answer: str | None
    where: str

    @property
    def supervised(self) -> int:
        return sum(self.loss_mask)


def ensure_chat_template(tokenizer: Any) -> bool:
    """Give template-less tokenizers a plain fallback; True when the fallback was installed."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = FALLBACK_TEMPLATE
    return True


def fingerprint(examples: list[Tokenized]) -> str:
    """What training reads of ``examples`` (token ids and loss masks, in order), as a short
    hash: a resumed run compares it with the one its plan recorded, since its data order is a
    function of the seed and the position alone and would silently go on over other data."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(len(ex.input_ids).to_bytes(4, "little"))
        digest.update(array("q", ex.input_ids).tobytes())
        digest.update(bytes(ex.loss_mask))
    return digest.hexdigest()[:16]


def seen_in_training(train: list[Tokenized], eval_: list[Tokenized]) -> list[tuple[str, str]]:
    """Eval examples that are word for word a training example (the same file passed twice,
    or duplicate rows split across a seeded split), each with the training example it copies:
    their loss and exact match measure memory, not generalisation."""
    first: dict[tuple[int, ...], str] = {}
    for ex in train:
        first.setdefault(tuple(ex.input_ids), ex.where)
    return [(ex.where, first[key]) for ex in eval_ if (key := tuple(ex.input_ids)) in first]


def tokenize_examples(
    examples: list[Example], tokenizer: Any, cache_dir: Path | None = None
) -> list[Tokenized]:
    """Tokenize every example; with ``cache_dir``, reuse an earlier identical tokenization.

    The cache key is the content itself (every example, the chat template, the vocabulary
    size and special tokens), so edited data or a different tokenizer never hit a stale entry.
    Rendering templates costs ~1 s per thousand chats, most of a cached plan's time.
    """
    if cache_dir is None:
        return [tokenize_example(ex, tokenizer) for ex in examples]
    key = hashlib.sha256(
        json.dumps(
            [
                [(ex.messages, ex.text, ex.where) for ex in examples],
                tokenizer.chat_template,
                len(tokenizer),
                tokenizer.eos_token,
                tokenizer.pad_token,
                type(tokenizer).__name__,
            ],
            default=str,
        ).encode()
    ).hexdigest()[:24]
    path = cache_dir / "tokens" / f"{key}.json"
    try:
        return [Tokenized(**row) for row in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):
        pass
    result = [tokenize_example(ex, tokenizer) for ex in examples]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(t) for t in result]))
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs time next run
    return result


def tokenize_example(example: Example, tokenizer: Any) -> Tokenized:
    if example.text is not None:
        return _tokenize_text(example, tokenizer)
    return _tokenize_chat(example, tokenizer)


def _tokenize_text(example: Example, tokenizer: Any) -> Tokenized:
    ids = list(tokenizer(example.text, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)  # learn where documents end
    mask = [False] + [True] * (len(ids) - 1)  # the first token has nothing to be predicted from
    return Tokenized(ids, mask, len(ids), None, example.where)


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def _tokenize_chat(example: Example, tokenizer: Any) -> Tokenized:
    messages = [dict(m) for m in example.messages or ()]
    full = _render(tokenizer, messages, False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True)
        through = _render(tokenizer, messages[: i + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise UserError(
                f"{example.where}: the model's chat template renders a conversation differently "
                "when it is cut after a turn, so the trained tokens cannot be located; use a "
                "model with a standard chat template"
            )
        spans.append((len(before), len(through)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [_in_spans(start, end, spans) for start, end in enc["offset_mapping"]]
    mask[0] = False
    last_start = spans[-1][0]
    prompt_length = next(
        (i for i, (start, end) in enumerate(enc["offset_mapping"]) if end > last_start), len(ids)
    )
    return Tokenized(
        ids,
        mask,
        prompt_length,
        messages[-1]["content"] if messages[-1]["role"] == "assistant" else None,
        example.where,
    )


def _in_spans(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    # a token belongs to a span when its first character does; zero-width tokens never train
    return end > start and any(lo <= start < hi for lo, hi in spans)
