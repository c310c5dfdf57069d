"""report.html and run listings from a synthetic run directory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.fake_run import HOSTILE, make_run
from tunepilot.cli import main
from tunepilot.errors import UserError
from tunepilot.report import build_report, list_runs


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return make_run(tmp_path / "runs" / "first", tmp_path / "no-model", weights=False)


def test_report_is_self_contained_and_complete(run_dir: Path):
    html = build_report(run_dir).read_text(encoding="utf-8")
    # plan table with every knob and its reason (escaped)
    assert '<table class="plan">' in html
    for knob in ("micro_batch_size", "global_batch_size", "learning_rate", "total_steps"):
        assert f"<code>{knob}</code>" in html
    assert "largest size that fits &lt;budget&gt;" in html
    # curves embedded as PNG data URIs, and written beside the report
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) >= 6
    pngs = sorted(p.name for p in (run_dir / "plots").glob("*.png"))
    assert {"loss.png", "lr.png", "grad_norm.png", "memory.png", "padding.png"} <= set(pngs)
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in (run_dir / "plots").iterdir())
    # model output is text, never markup
    assert HOSTILE not in html and "<script" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in html
    # each sample's prompt as the model saw it, template tokens included, also as text
    assert '<pre class="prompt">&lt;|im_start|&gt;user\nwhat is &lt;one&gt;?' in html
    # opens offline: nothing to fetch
    assert not re.search(r"https?://", html, re.IGNORECASE)
    assert "<link" not in html and "@import" not in html
    # guardian events, before/after evaluation, memory prediction vs measurement
    assert "Guardian events" in html and "rolled back to step 3" in html
    assert "0/6 (0.0%)" in html and "3/6 (50.0%)" in html
    assert "0.3 GB" in html and "0.35 GB" in html  # predicted total, measured peak
    # the half-written last metrics line is reported, not fatal
    assert "metrics.jsonl:" in html and "skipped" in html


def test_report_of_unfinished_run(run_dir: Path):
    # mid-run, train has written eval.json with the "before" evaluation only
    before = json.loads((run_dir / "eval.json").read_text())["before"]
    (run_dir / "eval.json").write_text(json.dumps({"before": before}))
    (run_dir / "events.jsonl").unlink()
    html = build_report(run_dir).read_text(encoding="utf-8")
    assert "unfinished" in html and "Guardian events" not in html
    assert "data:image/png;base64," in html and "0/6 (0.0%)" in html
    [figures] = list_runs(run_dir)
    assert not figures["finished"] and figures["steps"] == 10


def test_report_of_a_run_with_no_steps_yet(tmp_path: Path):
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "plan.json").write_text(json.dumps({"knobs": {}}))
    html = build_report(run).read_text(encoding="utf-8")
    assert "No training steps were logged yet" in html


def test_list_runs_finds_nested_runs(run_dir: Path, tmp_path: Path):
    make_run(tmp_path / "runs" / "group" / "second", tmp_path / "m", method="full", weights=False)
    (tmp_path / "runs" / "not-a-run").mkdir()
    runs = list_runs(tmp_path / "runs")
    assert [r["name"] for r in runs] == ["first", "group/second"]
    first = runs[0]
    assert first["method"] == "lora" and first["steps"] == 10
    assert first["final_loss"] == pytest.approx(0.3)
    assert (first["eval_loss_before"], first["eval_loss_after"]) == (2.5, 1.5)
    assert (first["exact_match_before"], first["exact_match_after"]) == (0.0, 0.5)
    assert first["tokens_per_s"] == 1005.0
    with pytest.raises(UserError, match="no such directory"):
        list_runs(tmp_path / "missing")


def test_runs_names_a_damaged_run_instead_of_leaving_it_out(run_dir: Path, tmp_path: Path, capsys):
    from tunepilot.cli import main

    root = tmp_path / "runs"
    make_run(root / "good", tmp_path / "m", weights=False)
    (root / "broken").mkdir()
    (root / "broken" / "plan.json").write_text("{not json")
    assert main(["runs", str(root)]) == 0
    out = capsys.readouterr().out
    assert "warning: skipped" in out and "broken/plan.json: unreadable" in out
    assert "good" in out


def test_cli_report_and_runs(run_dir: Path, tmp_path: Path, capsys):
    assert main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "report.html")
    assert main(["runs", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "first" in out and "lora" in out and "50.0%" in out


def test_cli_report_on_a_folder_that_is_not_a_run(tmp_path: Path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no plan.json" in err


def test_predicted_memory_includes_what_the_process_held_before_the_model(run_dir: Path):
    """A CPU run's measured peak is the whole process's; the memory model counts training
    state, so the prediction it is held against adds what the probe read before the model."""
    plan = json.loads((run_dir / "plan.json").read_text())
    plan["probe"] = {"resting_gb": 0.5}
    (run_dir / "plan.json").write_text(json.dumps(plan))
    html = build_report(run_dir).read_text(encoding="utf-8")
    assert "0.8 GB" in html and "the process before loading the model 0.5" in html
    assert "plus the 0.50 GB the process held before loading the model" in html  # the plot's
