"""Soak test of the guardian: many injected faults in longer runs; how many were survived.

    .venv/bin/python benchmarks/soak.py [--steps 60] [--kills 5] [--seed 0]

Uses a small random-weight Llama (real tokenizer, the bundled demo data) so it runs on a CPU in
minutes. Scenarios, each compared with an uninterrupted reference run of the same config:
  nan/spike storm: NaN gradients and loss spikes at random positions -> run finishes, finite;
  oom: micro-batches above 2 raise OOM -> micro-batch halved, every example seen once per epoch;
  kills: SIGKILL at random steps and inside checkpoint writes, each followed by a re-run of the
         same command -> the final loss sequence equals the reference exactly;
  sigterm: a preemption notice mid-run -> exit 143, then resume -> equals the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tunepilot import model as models
from tunepilot.config import bundled_recipe_path


def small_model(out: Path) -> Path:
    tok = AutoTokenizer.from_pretrained(models.local_dir(models.resolve("smollm2-135m-instruct")))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_config(path: Path, model: Path, steps: int, **debug) -> Path:
    data = bundled_recipe_path().parent / "data"
    path.write_text(
        yaml.safe_dump(
            {
                "model": str(model),
                "method": "lora",
                "data": {
                    "train": str(data / "bookings-train.jsonl"),
                    "eval": str(data / "bookings-eval.jsonl"),
                    "eval_max_examples": 8,
                },
                "train": {
                    "max_steps": steps,
                    "global_batch_size": 8,
                    "micro_batch_size": 4,
                    "precision": "fp32",
                    "save_every": 3,
                    "eval_every": 0,
                    "learning_rate": "1e-3",
                },
                "debug": debug,
            }
        )
    )
    return path


def run(config: Path, out: Path, *extra: str) -> int:
    cmd = [
        sys.executable,
        "-m",
        "tunepilot",
        "train",
        str(config),
        "--output-dir",
        str(out),
        "--quiet",
        *extra,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"CI": "1"})
    if done.returncode not in (0, -9, 143):
        print(f"{out.name}: exit {done.returncode}: {done.stderr.strip()[-500:]}")
    return done.returncode


def losses(out: Path) -> list[float]:
    by_step: dict[int, float] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            by_step[record["step"]] = record["loss"]  # the last (replayed) value wins
    return [by_step[s] for s in sorted(by_step)]


def events(out: Path) -> int:
    path = out / "events.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="tunepilot-soak-"))
    model = small_model(work / "model")
    rows = []

    ref = work / "reference"
    assert run(write_config(work / "ref.yaml", model, args.steps), ref) == 0
    reference = losses(ref)

    positions = sorted(rng.sample(range(5, args.steps), 8))
    nan, spikes = positions[::2], positions[1::2]
    out = work / "storm"
    code = run(
        write_config(work / "storm.yaml", model, args.steps, nan_at=nan, spike_at=spikes), out
    )
    finite = code == 0 and all(x == x for x in losses(out)) and len(losses(out)) == args.steps
    rows.append(("nan + spike storm", len(positions), events(out), finite))

    out = work / "oom"
    code = run(
        write_config(work / "oom.yaml", model, args.steps, oom_above=2, log_example_ids=True), out
    )
    ids = [
        i
        for line in (out / "metrics.jsonl").read_text().splitlines()
        for i in json.loads(line).get("example_ids", [])
    ]
    rows.append(("oom", 1, events(out), code == 0 and len(ids) == len(set(ids))))

    survived = 0
    out = work / "kills"
    kill_steps = sorted(rng.sample(range(2, args.steps), args.kills))
    for i, step in enumerate(kill_steps):
        key = "kill_in_checkpoint" if i % 2 and step % 3 == 0 else "kill_at_step"
        cfg = write_config(work / f"kill{i}.yaml", model, args.steps, **{key: step})
        if run(cfg, out) == -9:
            survived += 1  # died as injected; the next run must pick up from its checkpoint
    final = run(write_config(work / "kill-final.yaml", model, args.steps), out)
    identical = final == 0 and losses(out) == reference
    rows.append(("sigkill (mid-step / mid-checkpoint)", args.kills, survived, identical))

    out = work / "sigterm"
    cfg = write_config(work / "term.yaml", model, args.steps, sigterm_at_step=args.steps // 2)
    first, second = run(cfg, out), run(cfg, out)
    rows.append(("sigterm", 1, int(first == 143), second == 0 and losses(out) == reference))

    print(f"\nsoak: {args.steps} steps per run, work dir {work}")
    print(f"{'scenario':38} {'injected':>8} {'handled':>8}  outcome")
    for name, injected, handled, ok in rows:
        print(f"{name:38} {injected:>8} {handled:>8}  {'survived' if ok else 'FAILED'}")
    total = sum(r[1] for r in rows)
    ok = sum(r[1] for r in rows if r[3])
    print(f"faults injected: {total}, in scenarios that ended correctly: {ok}")
    sys.exit(0 if ok == total else 1)


if __name__ == "__main__":
    main()
