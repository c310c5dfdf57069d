"""A run directory as ``tunepilot train`` writes it, built in a second from a tiny model.

The files are synthetic (no training happens) but have the real layout: plan.json, config.yaml,
metrics.jsonl (with a half-written last line, as a killed run leaves), eval.json with sample
generations that contain HTML, events.jsonl, and a LoRA adapter + merged model saved by
tunepilot's own ``export`` functions.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import with_live_lora
from tunepilot.export import save_adapter, save_merged

HOSTILE = '<script>alert("x")</script> & <b>bold</b>'


def knob(value: object, source: str, reason: str) -> dict:
    return {"value": value, "source": source, "reason": reason}


def plan(model_dir: Path, method: str) -> dict:
    return {
        "knobs": {
            "micro_batch_size": knob(4, "auto", "largest size that fits <budget>"),
            "global_batch_size": knob(8, "user", "set in the config"),
            "learning_rate": knob(0.001, "auto", "LoRA: 2e-4 & friends"),
            "max_grad_norm": knob(1.0, "default", "clip the global gradient norm at 1.0"),
            "total_steps": knob(10, "auto", "max_steps governs"),
        },
        "data": {"format": "messages", "train_examples": 40, "length_percentiles": {"p50": 30}},
        "hardware": {"device": "cpu", "name": "Test CPU", "bf16": False},
        "model": {
            "name": str(model_dir),
            "path": str(model_dir),
            "method": method,
            "total_parameters": 1000,
            "trainable_parameters": 100,
        },
        "memory_estimate_gb": {"weights_gb": 0.1, "activations_gb": 0.2, "total_gb": 0.3},
        "warnings": ["a warning with <angle> brackets"],
    }


def metrics() -> list[dict]:
    records = [{"step": 0, "eval_loss": 2.5, "time": 1_790_000_000.0}]
    for step in range(1, 11):
        records.append(
            {
                "step": step,
                "epoch": 0,
                "loss": 3.0 / step,
                "lr": 1e-3 * min(1.0, step / 2),
                "grad_norm": 2.0 / step,
                "tokens_per_s": 1000.0 + step,
                "supervised_tokens": 50,
                "real_tokens": 200,
                "padding_fraction": 0.1,
                "memory_gb": 0.25 + step / 100,
                "elapsed_s": 0.2 * step,
                "time": 1_790_000_000.0 + step,
            }
        )
        if step % 5 == 0:
            records.append({"step": step, "eval_loss": 2.5 - step / 10, "time": 1.79e9 + step})
    return records


def evaluation() -> dict:
    sample = {
        "where": "eval.jsonl:3",
        "prompt": "<|im_start|>user\nwhat is <one>?<|im_end|>\n<|im_start|>assistant\n",
        "expected": "answer <one>",
        "correct": False,
    }
    before = {
        "loss": 2.5,
        "exact_match": {
            "accuracy": 0.0,
            "correct": 0,
            "total": 6,
            "samples": [sample | {"generated": HOSTILE}],
        },
    }
    after = {
        "loss": 1.5,
        "exact_match": {
            "accuracy": 0.5,
            "correct": 3,
            "total": 6,
            "samples": [sample | {"generated": "answer <one>", "correct": True}],
        },
    }
    return {
        "before": before,
        "after": after,
        "steps": 10,
        "train_seconds": 2.0,
        "real_tokens_per_s": 1005.0,
        "eval_losses": {"5": 2.0},
    }


def make_run(run_dir: Path, model_dir: Path, method: str = "lora", weights: bool = True) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "plan.json").write_text(json.dumps(plan(model_dir, method), indent=2))
    (run_dir / "config.yaml").write_text(f"model: {model_dir}\nmethod: {method}\n# <yaml>\n")
    lines = [json.dumps(r) for r in metrics()] + ['{"step": 11, "loss": 0.2']  # killed mid-write
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / "eval.json").write_text(json.dumps(evaluation(), indent=2))
    events = [
        {"step": 4, "kind": "loss spike", "action": "rolled back to step 3", "message": HOSTILE},
        {"step": 7, "kind": "nan", "action": "batch skipped", "message": "non-finite loss"},
    ]
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if weights:
        save_weights(run_dir, model_dir, method)
    return run_dir


def save_weights(run_dir: Path, model_dir: Path, method: str) -> None:
    """adapter/ and model/ exactly as run.train saves them; the adapter is made non-trivial
    (LoRA's B starts at zero, which would make any adapter check pass)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if method == "lora":
        model = with_live_lora(model, 0.5)
        save_adapter(model, run_dir / "adapter")
    save_merged(model, tokenizer, run_dir / "model")
