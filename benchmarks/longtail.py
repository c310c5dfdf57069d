"""A deterministic long-tailed chat dataset for speed benchmarks.

Real instruction data is long-tailed: most answers are a sentence or two, a few run to pages.
That tail is what makes naive padding expensive (one long example pads a whole micro-batch), so
a benchmark on uniform lengths would hide the cost. Lengths here are log-normal, clipped to about
20..1,000 tokens, and the text is made of common English words so the tokenizer behaves as on
prose (about 1.3 tokens per word for SmolLM2's tokenizer).

    python benchmarks/longtail.py OUT.jsonl [--rows N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

_PROSE = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no will "
    "more can out up into do any your what some could time these two may then first about other "
    "than new only also after made well like over such our even most through many years just "
    "where before must back used because same each under down great still three between old "
    "work life should long never world might state while both number those against people "
    "water house place small again order early light night large system point hand rather "
    "model data train value table report answer question river market field school country "
    "paper morning power music city garden engine window letter market doctor color island"
)
WORDS = _PROSE.split()
TOPICS = ("rivers", "engines", "gardens", "markets", "islands", "music", "cities", "letters")
ASKS = ("Explain", "Describe", "Summarise what you know about", "Write a short note on", "List")


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 16))]
    return " ".join(words).capitalize() + "."


def _text(rng: random.Random, n_words: int) -> str:
    out: list[str] = []
    while sum(len(s.split()) for s in out) < n_words:
        out.append(_sentence(rng))
    return " ".join(out)


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` chat rows; answer lengths log-normal (median ~60 words, tail to ~720)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        answer_words = int(min(720, max(3, math.exp(rng.gauss(math.log(60), 0.9)))))
        prompt = f"{rng.choice(ASKS)} {rng.choice(TOPICS)}. {_text(rng, rng.randint(0, 20))}"
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": _text(rng, answer_words)},
                ]
            }
        )
    return rows


def write(path: Path, n: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(n, seed)))
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write(args.out, args.rows, args.seed))
