"""Speed and peak memory over a long run, by host malloc: tcmalloc against the system's.

    .venv/bin/python benchmarks/long_run.py [--steps 80] [--repeat 1] [--method full]
        [--precision bf16] [--allocators tcmalloc,system]

compare.py's "same settings" job (its long-tailed data, micro-batch 8, packing), run through the
real CLI (`python -m tunepilot train`), once per allocator per round, with TUNEPILOT_ALLOCATOR
set: "tcmalloc" is what the CLI picks when tcmalloc is installed, "system" keeps glibc (session
16's "glibc-defaults" row, against the heap-reuse settings tunepilot then used, is in commit
cd50ba6). Prints real tokens/s over step ranges and the peak RSS reached by the end of each
range, from the run's metrics.jsonl. 16-step benchmarks hide what a fragmenting heap does over a
few hundred steps; this shows it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare  # noqa: E402
import longtail  # noqa: E402


def ranges(steps: int) -> list[tuple[int, int]]:
    """Step ranges to report: the first step left out (warm-up), then quarters."""
    edges = [1, *sorted({max(2, steps * k // 4) for k in (1, 2, 3)}), steps]
    return [(a, b) for a, b in itertools.pairwise(edges) if b > a]


def summary(metrics: Path, steps: int) -> str:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if "tokens_per_s" in line]
    by_step = {r["step"]: r for r in rows}
    cells = []
    for a, b in ranges(steps):
        timed = [r for r in rows if a < r["step"] <= b]
        seconds = by_step[b]["elapsed_s"] - by_step[a]["elapsed_s"]
        tokens = sum(r["real_tokens"] for r in timed) / seconds
        cells.append(f"steps {a + 1}-{b}: {tokens:.0f} tok/s, {by_step[b]['memory_gb']:.2f} GB")
    return "; ".join(cells)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--method", default="full", choices=("full", "lora"))
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--allocators", default="tcmalloc,system")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tunepilot-long-"))
    try:
        data = longtail.write(work / "train.jsonl", 512, seed=0)
        (work / "eval.jsonl").write_text(json.dumps({"text": "held-out line."}) + "\n")
        spec = {
            "data": str(data),
            "eval": str(work / "eval.jsonl"),
            "method": args.method,
            "steps": args.steps,
            "precision": args.precision,
            "options": {},
        }
        sets = [x for o in compare._overrides(spec, auto=False) for x in ("--set", o)]
        print(
            f"{args.method} {args.precision}, {args.steps} steps, micro-batch 8, packed", flush=True
        )
        for round_ in range(args.repeat):
            for allocator in args.allocators.split(","):
                out = work / f"{allocator}-{round_}"
                env = os.environ | {"TUNEPILOT_ALLOCATOR": allocator}
                env.pop("TUNEPILOT_RELAUNCHED", None)
                cmd = [sys.executable, "-m", "tunepilot", "train", *sets, "--output-dir", str(out)]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"{allocator}: exit {done.returncode}: {done.stderr.strip()[-300:]}")
                    continue
                print(f"{allocator:9} {summary(out / 'metrics.jsonl', args.steps)}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
