"""Is the planned micro-batch really the fast one? A grid against the plan's choice.

    .venv/bin/python benchmarks/batch_grid.py [--sizes 1 2 4 8 16] [--length 128]

For the bundled model and demo recipe on this machine: tokens/s and peak memory of real training
steps (the same measurement the planner's probe makes) over micro-batch x gradient checkpointing,
with the plan's choice marked. The autopilot issue asks for the choice to be within 10% of the
best point of the grid.
"""

from __future__ import annotations

import argparse
import time

from tunepilot import hardware
from tunepilot import model as models
from tunepilot.config import load_config
from tunepilot.plan.probe import measure
from tunepilot.run import load_trainable, prepare, resized_vocab


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(None, args.overrides)
    prep = prepare(cfg)  # the plan, with its own probe (cached after the first run)
    plan = prep.plan
    hw = hardware.detect()
    length, precision = plan["max_length"], plan["precision"]
    chosen = (plan["micro_batch_size"], plan["gradient_checkpointing"])
    model = load_trainable(cfg, prep.source, resized_vocab(prep))
    rows = []
    for ckpt in (False, True):
        if ckpt:
            models.enable_gradient_checkpointing(model)
        for size in args.sizes:
            tick = time.perf_counter()
            p = measure(
                model,
                size,
                length,
                precision,
                ckpt,
                hw.device,
                len(prep.tokenizer),
                0.8 * hw.memory_available_gb,
            )
            rows.append((size, ckpt, p.tokens_per_s, p.peak_gb, time.perf_counter() - tick))
    best = max(r[2] for r in rows)
    print(f"\n{hw.name}, {hw.cores} cores; {cfg.model} {cfg.method}, length {length}, {precision}")
    print(f"{'micro':>5} {'ckpt':>5} {'tokens/s':>9} {'peak GB':>8} {'of best':>8}")
    for size, ckpt, tps, peak, _ in rows:
        mark = "  <- plan" if (size, ckpt) == chosen else ""
        print(f"{size:>5} {ckpt!s:>5} {tps:>9.0f} {peak:>8.2f} {tps / best:>8.0%}{mark}")
    planned = next((r for r in rows if (r[0], r[1]) == chosen), None)
    if planned:
        print(f"plan's choice runs at {planned[2] / best:.0%} of the best grid point")


if __name__ == "__main__":
    main()
