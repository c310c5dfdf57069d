"""A few steps on the real bundled model; its model/ loads and generates in plain transformers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tunepilot.cli import main

STANDALONE = """
import sys
sys.modules["tunepilot"] = None  # prove the output does not need tunepilot
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
assert model.config.use_cache, "use_cache must be restored for generation"
assert tok.chat_template and tok.pad_token and tok.pad_token != tok.eos_token
prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                 add_generation_prompt=True)
ids = tok([prompt], return_tensors="pt")
out = model.generate(**ids, max_new_tokens=5, do_sample=False)
print("generated", out.shape[1] - ids["input_ids"].shape[1])
"""


@pytest.mark.slow
def test_bundled_model_trains_and_exports(bundled_dir: Path, tmp_path: Path):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--output-dir",
            str(out),
            "--quiet",
            "--set",
            "train.max_steps=2",
            "--set",
            "train.global_batch_size=8",
            "--set",
            "train.precision=fp32",
            "--set",
            "data.eval_max_examples=8",
        ]
    )
    assert code == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["model"]["name"] == "smollm2-135m-instruct"
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)
    result = subprocess.run(
        [sys.executable, "-c", STANDALONE, str(out / "model")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "generated" in result.stdout
