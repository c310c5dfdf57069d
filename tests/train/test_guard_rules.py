"""The guardian's judgement on synthetic step statistics (no model needed)."""

import math

import pytest

from tunepilot.errors import RunError
from tunepilot.train.guard import MAX_REPAIRS, MAX_SKIPS, Guardian, Verdict, next_precision


@pytest.fixture
def guardian(tmp_path):
    g = Guardian(events_path=tmp_path / "events.jsonl")
    for i in range(20):  # a calm history: losses ~2.0, gradient norms ~1.0
        g.accepted(2.0 + 0.01 * (i % 3), 1.0 + 0.01 * (i % 2))
    return g


def test_normal_step_is_ok(guardian):
    assert guardian.judge(2.02, 1.0, 100, "fp32", False).action == "ok"


def test_loss_spike_and_gradient_explosion_are_skipped(guardian):
    assert guardian.judge(9.0, 1.0, 100, "fp32", False).kind == "spike"
    verdict = guardian.judge(2.0, 80.0, 100, "fp32", False)
    assert verdict.action == "skip" and "gradient norm" in verdict.message


def test_nan_escalates_skip_then_rollback_then_precision(guardian):
    assert guardian.judge(math.nan, math.nan, 100, "bf16", False).action == "skip"
    assert guardian.judge(math.nan, math.nan, 100, "bf16", False).action == "rollback"
    guardian.rollbacks = 1
    assert guardian.judge(math.nan, math.nan, 100, "bf16", False).action == "precision"


def test_zero_loss_switches_precision_then_stops_in_fp32(guardian):
    verdicts = [guardian.judge(0.0, 0.5, 100, "fp16", False).action for _ in range(3)]
    assert verdicts == ["ok", "ok", "precision"]
    guardian.zero_streak = 0
    verdicts = [guardian.judge(0.0, 0.5, 100, "fp32", False) for _ in range(3)]
    assert verdicts[-1].action == "stop" and "label masks" in verdicts[-1].message


def test_batch_without_targets_is_skipped(guardian):
    assert guardian.judge(0.0, 0.0, 0, "fp32", False).kind == "empty batch"


def test_running_out_of_skips_on_empty_batches_points_at_the_data(guardian):
    """Not at the learning rate: no setting of it gives an empty batch a target."""
    empty = guardian.judge(0.0, 0.0, 0, "fp32", False)
    with pytest.raises(RunError) as err:
        for i in range(MAX_SKIPS + 1):
            guardian.record(1, i, empty, "batch skipped")
    message = str(err.value)
    assert "train.max_length" in message and "--show-sample" in message
    assert "learning_rate" not in message


def test_scaler_overflows_are_absorbed_until_a_storm(guardian):
    actions = [guardian.judge(2.0, math.inf, 100, "fp16", True).action for _ in range(5)]
    assert actions == ["ok"] * 4 + ["precision"]


def test_precision_ladder():
    assert next_precision("fp16", True) == "bf16"
    assert next_precision("fp16", False) == "fp32"
    assert next_precision("bf16", False) == "fp32"
    assert next_precision("fp32", True) is None


def test_retry_budget_ends_in_a_diagnosis(guardian, tmp_path):
    with pytest.raises(RunError, match=r"training stopped at step .* Tried: step"):
        for i in range(MAX_REPAIRS + 2):
            guardian.record(i, i, Verdict("rollback", "non-finite", "nan"), "rolled back")
    assert len((tmp_path / "events.jsonl").read_text().splitlines()) == MAX_REPAIRS + 1
