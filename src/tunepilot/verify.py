"""Check an exported model against its source: same prompts, same token ids, logits compared.

An export that loads is not yet an export that works: a missed permutation or a dropped tensor
loads fine and then talks nonsense. Every ``tunepilot export`` therefore reloads what it wrote
with the library a user would use, runs a few prompts through both models and reports the
largest absolute logit difference against a tolerance (``RunError``, exit 3, when over it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunepilot.errors import RunError
from tunepilot.inference import logits_for

#: a chat turn (the format the model was tuned on), plain text, digits, code and non-ASCII
PROMPTS = (
    "Can you reserve Friday at 12:15 pm for one? Name is Kwame Rossi.",
    "The capital of France is",
    "def add(a, b):\n    return a + b  # 1234567890",
    "Grüße aus Köln — ¿qué tal? 東京",
)


@dataclass(frozen=True)
class Check:
    what: str  # e.g. "hf export vs run model"
    max_abs_diff: float
    tolerance: float
    prompts: int
    tokens: int
    reference_max: float = 0.0  # largest |logit| of the reference: the scale of the numbers

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance  # NaN compares False: a NaN fails

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (
            f"{self.what}: max |logit diff| {self.max_abs_diff:.3g} over {self.prompts} prompts "
            f"({self.tokens} positions), tolerance {self.tolerance:g}: {verdict}"
        )


def prompt_ids(tokenizer: Any) -> list[list[int]]:
    """Token ids of the check prompts: the first through the chat template, the rest raw."""
    first = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}], tokenize=False, add_generation_prompt=True
    )
    texts = [first, *PROMPTS[1:]]
    return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def compare(
    what: str,
    reference: nn.Module | list[torch.Tensor],
    candidate: nn.Module | list[torch.Tensor],
    ids: list[list[int]],
    tolerance: float,
    vocab: int | None = None,
) -> Check:
    """Max absolute difference of two models' fp32 logits on ``ids`` (first ``vocab`` columns
    only, when one model has extra embedding rows the other lacks). Either side may be logits
    already computed with ``logits_for``, so one model is not run twice."""
    ref = reference if isinstance(reference, list) else logits_for(reference, ids)
    cand = candidate if isinstance(candidate, list) else logits_for(candidate, ids)
    worst, positions, scale = 0.0, 0, 0.0
    for a, b in zip(ref, cand, strict=True):
        if vocab is not None:
            a, b = a[:, :vocab], b[:, :vocab]
        if a.shape != b.shape:
            raise RunError(f"{what}: logits have shape {tuple(b.shape)}, expected {tuple(a.shape)}")
        diff = (a - b).abs().max().item()
        worst = diff if diff != diff else max(worst, diff)  # keep a NaN: it must fail
        positions += a.shape[0]
        scale = max(scale, a.abs().max().item())
    return Check(what, worst, tolerance, len(ids), positions, scale)


def compare_tokenizers(what: str, reference: Any, candidate: Any) -> None:
    """The exported tokenizer must turn every check prompt into the same ids, and carry the
    same chat template and end-of-sequence token (or generation would not stop)."""
    for attr in ("chat_template", "eos_token"):
        if getattr(reference, attr, None) != getattr(candidate, attr, None):
            raise RunError(f"{what}: the reloaded tokenizer's {attr} differs from the source's")
    for text in PROMPTS:
        a = reference(text, add_special_tokens=False)["input_ids"]
        b = candidate(text, add_special_tokens=False)["input_ids"]
        if list(a) != list(b):
            raise RunError(
                f"{what}: tokenizer differs from the source on {text[:40]!r}: {list(b)[:12]} "
                f"vs {list(a)[:12]}"
            )


def require(checks: list[Check], path: Path) -> None:
    """RunError naming each failed check; the files stay at ``path`` for whoever debugs them."""
    failed = [c.line() for c in checks if not c.ok]
    if failed:
        raise RunError(
            "export verification failed, the exported files do not reproduce the run's model: "
            + "; ".join(failed)
            + f"; left in {path} for inspection, not for use"
        )


def rounded_to_f16(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose matrices went through fp16 and back, as an f16 file stores them
    (1-D norm weights stay fp32, as llama.cpp writes them)."""
    import copy

    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            if p.dim() > 1:
                p.copy_(p.to(torch.float16).to(p.dtype))
    return clone
