"""lr-find through the CLI, and learning_rate: find inside train, on the tiny model."""

import json
from pathlib import Path

import yaml

from tests.conftest import write_run_config
from tunepilot.cli import main


def make_config(tmp_path: Path, model: Path, lr: str) -> Path:
    train = {
        "max_steps": 3,
        "global_batch_size": 8,
        "micro_batch_size": 8,
        "precision": "fp32",
        "gradient_checkpointing": False,
        "learning_rate": lr,
    }
    return write_run_config(tmp_path, model, train, n_train=48, n_eval=8, eval_seed=5)


def test_lr_find_command_writes_plot_and_results(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "lrf"
    assert (
        main(
            [
                "lr-find",
                str(make_config(tmp_path, tiny_model_dir, "auto")),
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads((out / "lr_find.json").read_text())
    assert (out / "lr_find.png").stat().st_size > 0
    out_text = capsys.readouterr().out
    assert "learning_rate:" in out_text
    rates = [line for line in out_text.splitlines() if ": held-out loss " in line]
    assert len(rates) == len(result["sweep"])  # one readable line per rate
    assert "{'lr'" not in out_text  # the sweep rows were printed again as raw dicts
    assert result


def test_train_with_learning_rate_find(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(make_config(tmp_path, tiny_model_dir, "find")),
                "--output-dir",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    knob = json.loads((out / "plan.json").read_text())["knobs"]["learning_rate"]
    assert isinstance(knob["value"], float) and knob["value"] > 0
    assert "range test" in knob["reason"] and "sweep" in knob["reason"]
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["learning_rate"] == knob["value"]
    assert (out / "lr_find.png").is_file()
