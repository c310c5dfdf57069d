"""The LR finder on the bundled recipe: SmolLM2-135M-Instruct + LoRA on the booking data.

    .venv/bin/python benchmarks/lr_find_demo.py [--range-steps 50] [--range-budget 120]
        [--sweep-steps 24] [--sweep-budget 300] [--output-dir runs/lr-find-demo]
        [--set train.probe_seconds=0 ...]

Prints the range test's suggestion, each sweep candidate's held-out loss, the pick and the wall
time of each stage; writes lr_find.png and lr_find.json to the output dir. It also checks that
the model came back bit-exactly (the trainable weights before and after).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tunepilot.config import load_config
from tunepilot.plan.lr_find import StepSetup, find_learning_rate
from tunepilot.run import build_model, prepare


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--range-steps", type=int, default=50)
    p.add_argument("--range-budget", type=float, default=120.0)
    p.add_argument("--sweep-steps", type=int, default=24)
    p.add_argument("--sweep-budget", type=float, default=300.0)
    p.add_argument("--max-eval", type=int, default=64)
    p.add_argument("--output-dir", type=Path, default=Path("runs/lr-find-demo"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()

    start = time.perf_counter()
    cfg = load_config(None, args.overrides)
    prep = prepare(cfg)
    plan = prep.plan
    model = build_model(prep, plan.hardware.device)
    setup = StepSetup.from_plan(plan, cfg.method, prep.tokenizer.pad_token_id, cfg.train.seed)
    print(f"loaded in {time.perf_counter() - start:.1f}s; {setup}")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    tick = time.perf_counter()
    result = find_learning_rate(
        model,
        prep.train,
        prep.eval,
        setup,
        out_dir=args.output_dir,
        range_steps=args.range_steps,
        range_budget_s=args.range_budget,
        sweep_steps=args.sweep_steps,
        sweep_budget_s=args.sweep_budget,
        max_eval=args.max_eval,
        log=print,
    )
    seconds = time.perf_counter() - tick

    rt = result.range_test
    exact = all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    print(
        f"\nrange test: {rt['steps']} steps in {rt['seconds']:.0f}s "
        f"({rt['seconds_per_step']:.2f}s/step), stopped: {rt['stop']}; "
        f"loss {rt['losses'][0]:.3f} at {rt['lrs'][0]:.1e} -> min smoothed "
        f"{min(rt['smoothed']):.3f} at {rt['min_loss_lr']:.1e}"
    )
    print(f"suggestion {result.suggestion:.2e} ({rt['rule']})")
    for c in result.sweep:
        mark = " <- chosen" if c["chosen"] else ""
        mark += " (rule default)" if c["default"] else ""
        print(
            f"  lr {c['lr']:.1e}: held-out loss {c['eval_loss']:.4f}, last train loss "
            f"{c['train_loss_last']:.4f}, {c['steps']} steps, {c['seconds']:.0f}s{mark}"
        )
    print(f"chosen {result.chosen:.1e}; finder wall time {seconds:.0f}s; model restored: {exact}")
    print(f"reason: {result.reason}")
    print(f"plot: {result.plot}")


if __name__ == "__main__":
    main()
