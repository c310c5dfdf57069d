"""The measured autopilot: batch finder with simulated OOM, budget errors, cache, CPU precision."""

import ctypes
import json
import re
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import chat_rows, tiny_model, write_jsonl
from tunepilot import distributed, hardware
from tunepilot import model as models
from tunepilot.cli import main
from tunepilot.config import TrainSettings
from tunepilot.errors import UserError
from tunepilot.hardware import Hardware, resident_bytes
from tunepilot.plan import probe
from tunepilot.plan.batch import decide_by_probe
from tunepilot.plan.decision import Decision
from tunepilot.plan.memory import ModelShape, estimate
from tunepilot.plan.plan import _probe_summary
from tunepilot.plan.probe import TIMED_STEPS, ProbePoint, measure, within_budget
from tunepilot.train import allocator

CPU_BF16 = Hardware("cpu", "fake", 16, 16, 2, True, "fake", None)
GPU = Hardware("cuda", "fake", 80, 80, 8, True, "fake", (8, 0))


def fake_measure(
    fits_up_to: int, speed: dict[int, float], bf16_gain: float = 2.0, bf16_loss_shift: float = 0.0
):
    calls = []

    def measure(micro, length, precision, ckpt):
        calls.append((micro, precision, ckpt))
        fits = micro <= fits_up_to or (ckpt and micro <= 2 * fits_up_to + 2)
        tps = speed.get(micro, 100.0) * (bf16_gain if precision == "bf16" else 1.0)
        loss = 2.0 + (bf16_loss_shift if precision == "bf16" else 0.0)
        return ProbePoint(micro, length, precision, ckpt, fits, tps if fits else 0, 1.0, loss)

    return measure, calls


def decide(measure, hw=GPU, global_batch=64, **settings):
    t = TrainSettings(**settings)
    rule = Decision("bf16", "auto", "rule")
    # fake speeds are arbitrary units: a deadline far enough off for every trial they predict
    deadline = time.monotonic() + 1e6
    return decide_by_probe(t, hw, rule, global_batch, 10_000, 256, measure, deadline)


def test_finder_never_returns_a_size_that_failed():
    measure, calls = fake_measure(24, {8: 100, 16: 180, 24: 200, 32: 0})
    _, micro, ckpt, points = decide(measure, global_batch=48)
    assert micro.value == 24 and ckpt.value is False
    assert all(p.fits for p in points if p.micro_batch == micro.value)
    assert 48 % micro.value == 0  # the global batch stays a multiple
    assert [c[0] for c in calls] == [8, 16, 48, 24]  # grow by doubling, then bisect


def test_finder_prefers_fastest_over_largest():
    measure, _ = fake_measure(64, {8: 100, 16: 150, 32: 151, 64: 120})
    _, micro, _, _ = decide(measure)
    assert micro.value == 16  # 32 fits but is not 3% faster


def test_checkpointing_only_when_needed():
    measure, _ = fake_measure(0, {1: 10, 2: 15})
    _, micro, ckpt, _ = decide(measure, global_batch=8)
    assert ckpt.value is True and "needed" in ckpt.reason and micro.value >= 1


def test_nothing_fits_is_a_user_error():
    def never(micro, length, precision, ckpt):
        return ProbePoint(micro, length, precision, ckpt, False, note="out of memory")

    with pytest.raises(UserError, match="memory_budget_gb"):
        decide(never, global_batch=8)


@pytest.mark.parametrize(
    ("gain", "shift", "expected"),
    [
        (2.0, 0.0, "bf16"),
        (1.01, 0.0, "fp32"),
        (2.0, 0.5, "fp32"),
        (2.0, float("nan"), "fp32"),
        # bf16 rounding on the random-token probe batch: ~3% (measured on SmolLM2-135M)
        (2.0, 0.06, "bf16"),
    ],
)
def test_cpu_precision_needs_speed_and_agreement(gain, shift, expected):
    measure, _ = fake_measure(16, {8: 100, 16: 100}, bf16_gain=gain, bf16_loss_shift=shift)
    prec, _, _, _ = decide(measure, hw=CPU_BF16, global_batch=16)
    assert prec.value == expected and "measured" in prec.reason


@pytest.fixture
def config(tmp_path: Path, tiny_model_dir: Path) -> Path:
    write_jsonl(tmp_path / "train.jsonl", chat_rows(64))
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_model_dir),
                "data": {"train": "train.jsonl"},
                "train": {"global_batch_size": 16, "precision": "fp32", "max_steps": 4},
            }
        )
    )
    return path


def plan_json(capsys, config: Path, *sets: str) -> dict:
    args = ["plan", str(config), "--json"]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


def test_real_probe_with_simulated_oom_on_the_tiny_model(config: Path, capsys):
    plan = plan_json(capsys, config, "debug.oom_above=4")
    knobs = plan["knobs"]
    assert knobs["micro_batch_size"]["value"] == 4
    assert knobs["global_batch_size"]["value"] == 16
    assert knobs["gradient_accumulation_steps"]["value"] == 4
    failed = [p for p in plan["probe"]["points"] if not p["fits"]]
    assert failed and all(p["micro_batch"] > 4 and p["note"] == "out of memory" for p in failed)
    probe = plan["probe"]
    # on a CPU the peak is the whole process's; the part held before the model loaded
    # (libraries, tokenizer, data) is kept apart, since the memory model counts training state
    assert 0 < probe["resting_gb"] < probe["measured_peak_gb"] and "memory_model_error" in probe


def test_a_probe_trial_killed_for_memory_reads_does_not_fit(config: Path, capsys):
    """On a CPU, running out of memory is the kernel's SIGKILL, not an exception: the trial's
    worker dies, the size reads "does not fit", and the plan goes on from the sizes that ran."""
    plan = plan_json(capsys, config, "debug.probe_killed_above=4")
    assert plan["knobs"]["micro_batch_size"]["value"] == 4
    failed = [p for p in plan["probe"]["points"] if not p["fits"]]
    assert failed and all(p["micro_batch"] > 4 for p in failed)
    assert all(p["note"] == "out of memory: killed by the system" for p in failed)
    # the worker that was killed is replaced: sizes tried after the kill still ran
    assert any(
        p["fits"] and p["micro_batch"] < min(f["micro_batch"] for f in failed)
        for p in plan["probe"]["points"][1:]
    )


def test_probe_results_are_cached(config: Path, capsys):
    first = plan_json(capsys, config, "train.max_length=128")
    second = plan_json(capsys, config, "train.max_length=128")
    assert first["probe"]["cached"] is False and second["probe"]["cached"] is True
    assert first["knobs"]["micro_batch_size"] == second["knobs"]["micro_batch_size"]


def test_each_probe_trial_is_announced_before_it_runs(config: Path, capsys):
    """A trial is three training steps, minutes for a large model on a CPU: the plan says what it
    is timing instead of sitting silent (on stderr under --json, so stdout stays JSON)."""
    args = ["plan", str(config), "--json", "--set", "train.max_length=192"]
    assert main(args) == 0
    captured = capsys.readouterr()
    points = json.loads(captured.out)["probe"]["points"]
    intro, *trials = [x for x in captured.err.splitlines() if x.startswith("probe: ")]
    assert "train.probe_seconds=0" in intro and len(trials) == len(points) >= 1
    for line, p in zip(trials, points, strict=True):
        assert f"{p['micro_batch']} x {p['max_length']} tokens, {p['precision']}" in line
    assert main(args) == 0
    assert "probe: " not in capsys.readouterr().err  # read from the cache: nothing runs


def test_memory_budget_too_small_exits_2(config: Path, capsys):
    assert main(["plan", str(config), "--set", "train.memory_budget_gb=0.01"]) == 2
    assert "error: train.memory_budget_gb: not even 1 example" in capsys.readouterr().err


def test_plan_explain_shows_measurements(config: Path, capsys):
    assert main(["plan", str(config), "--explain"]) == 0
    out = capsys.readouterr().out
    assert "probe measurements" in out and "- micro_batch_size = " in out
    assert "measured" in out and "time: ~" in out
    assert re.search(r"on\s+top\s+of\s+the\s+[\d.]+\s+GB\s+the\s+process\s+held", out)
    # a short run is predicted in seconds, not as "~0 min"
    assert re.search(r"~\d+\s+s\s+for\s+\d+\s+steps", out) and "~0 min" not in out


def test_cpu_precision_when_only_bf16_fits():
    """fp32 overflows the budget at 8 but fits at 4: compare there, where both fit."""

    def measure(micro, length, precision, ckpt):
        fits = micro <= (8 if precision == "bf16" else 4)
        tps = 100.0 * (2.0 if precision == "bf16" else 1.0)
        return ProbePoint(micro, length, precision, ckpt, fits, tps if fits else 0, 1.0, 2.0)

    prec, micro, _, points = decide(measure, hw=CPU_BF16, global_batch=8)
    assert prec.value == "bf16" and "2.00x faster" in prec.reason
    assert micro.value == 8
    assert {(p.micro_batch, p.precision) for p in points} >= {(4, "fp32"), (4, "bf16")}

    def fp32_never(micro, length, precision, ckpt):
        fits = precision == "bf16"
        return ProbePoint(micro, length, precision, ckpt, fits, 100.0 if fits else 0, 1.0, 2.0)

    prec, _, _, _ = decide(fp32_never, hw=CPU_BF16, global_batch=8)
    assert prec.value == "bf16" and "fp32 does not fit" in prec.reason


@pytest.mark.parametrize("pays", [True, False])
def test_probe_rows_hold_the_heaviest_sequences_training_can_see(monkeypatch, pays):
    """Where explicit attention may run, sequences up to EXPLICIT_UP_TO hold score tables and
    longer ones hold none: the probe's packed row is cut into the heaviest length, keeping its
    token count, so no real row of as many tokens can need more memory than was measured."""
    from tunepilot.plan.probe import _synthetic_batch
    from tunepilot.train import attention

    monkeypatch.setattr(attention, "_explicit_pays", lambda: pays)
    up_to = attention.EXPLICIT_UP_TO
    assert attention.heaviest_length(up_to + 300, "bf16", "cpu") == (up_to if pays else up_to + 300)
    assert attention.heaviest_length(up_to, "bf16", "cpu") == up_to  # measured as it is
    assert attention.heaviest_length(up_to + 300, "fp32", "cpu") == up_to + 300
    assert attention.heaviest_length(up_to + 300, "bf16", "cuda") == up_to + 300

    piece = attention.heaviest_length(up_to + 300, "bf16", "cpu")
    batch = _synthetic_batch(2, up_to + 300, 1000, True, piece=piece)
    lengths = batch.cu_seq_lens.diff().tolist()
    assert sum(lengths) == 2 * (up_to + 300)
    assert lengths == ([up_to, 300] * 2 if pays else [up_to + 300] * 2)


M_MMAP_MAX = -4  # mallopt's parameter (malloc.h)


def test_a_trial_leaves_out_what_earlier_trials_freed():
    """A trial that failed the budget frees its memory, but glibc keeps freed heap blocks
    resident: the smaller size tried next must not be charged for them, or the search would
    reject sizes that fit. A 1 GB hole inside the heap stands in for the earlier trial."""
    libc = allocator._libc()
    if libc is None:
        pytest.skip("glibc's heap only")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 2**30
    before = resident_bytes() / 2**30
    libc.mallopt(M_MMAP_MAX, 0)  # from the heap, not a mmap handed back on free
    pins = []  # blocks above the hole: while one is held, freeing cannot shrink the heap past it
    try:
        hole = libc.malloc(size)
        while len(pins) < 10_000 and (not pins or pins[-1] < hole):  # free blocks below go first
            pins.append(libc.malloc(2**20))
        assert hole and pins[-1] > hole
        ctypes.memset(hole, 1, size)  # touch every page: resident
        libc.free(hole)
    finally:
        libc.mallopt(M_MMAP_MAX, 65536)  # glibc's default
    held = resident_bytes() / 2**30  # resident now, read as the probe reads it
    if held - before < 0.9:
        for pin in pins:
            libc.free(pin)
        # a failed allocation earlier in this process (test_hardware, debug.oom_above in the
        # loop) turns glibc's main heap to mmap'd pieces that free hands back: no hole stays
        pytest.skip("the freed block was not kept resident: glibc's heap is not contiguous here")
    try:
        point = measure(tiny_model(vocab_size=512), 2, 64, "fp32", False, "cpu", 512, 100.0)
    finally:
        for pin in pins:
            libc.free(pin)
    assert point.fits and point.peak_gb < held - 0.5, (point.peak_gb, held)


def test_a_checkpointing_trial_recomputes_even_on_a_model_loaded_for_inference():
    """from_pretrained returns a model in eval mode, where transformers skips checkpointing:
    a full fine-tune's checkpointing trials then timed and weighed steps without it (measured:
    the same 8.5 GB peak either way at 8 x 512 tokens). A trial trains: each layer runs again
    in backward."""
    model = tiny_model(vocab_size=512).eval()
    models.enable_gradient_checkpointing(model)
    layer = model.model.layers[0]
    checkpoint, runs = layer._gradient_checkpointing_func, []

    def counted(forward, *args, **kwargs):
        def run(*a, **k):
            runs.append(1)
            return forward(*a, **k)

        return checkpoint(run, *args, **kwargs)

    layer._gradient_checkpointing_func = counted
    point = measure(model, 2, 32, "fp32", True, "cpu", 512, 100.0)
    # a warm-up step and the timed ones, each a forward and a recomputation
    assert point.fits and len(runs) == 2 * (1 + TIMED_STEPS)


def test_a_trial_counts_its_fastest_timed_step(monkeypatch):
    """One timed step read +-15% from run to run on a CPU, and one slow reading turned
    torch.compile on for the demo (session 23): the fastest of the timed steps counts."""
    model = tiny_model(vocab_size=512)
    clock = iter([0.0, 10.0, 10.0, 11.0])  # timed steps of 10 s, then 1 s

    class Clock:
        @staticmethod
        def perf_counter() -> float:
            return next(clock)

    monkeypatch.setattr(probe, "time", Clock)
    point = measure(model, 2, 32, "fp32", False, "cpu", 512, 100.0)
    assert TIMED_STEPS == 2
    assert point.tokens_per_s == pytest.approx(2 * 32 / 1.0)


def test_memory_model_error_compares_training_state_with_what_training_added():
    """The memory model counts weights, optimizer state and activations; the probe's CPU peak
    also holds the interpreter, libraries and data, which the error must not count as its own
    (the demo read -20% that way, +3% like for like)."""
    shape = ModelShape(135_000_000, 5_000_000, 576, 30, 49152, 8192)
    point = ProbePoint(8, 128, "bf16", False, True, 400.0, 2.5, resting_gb=0.5)
    summary = _probe_summary([point], shape, 128, 8, "bf16", False, 8, 1.0)
    predicted = estimate(shape, 8, 128, "bf16", False).total_gb
    assert summary["memory_model_error"] == pytest.approx((predicted - 2.0) / 2.0, abs=1e-3)
    assert summary["resting_gb"] == 0.5 and summary["measured_peak_gb"] == 2.5


def test_the_budget_bounds_what_training_adds_not_the_interpreter():
    """Free memory is read with the process already resident, so its 0.5 GB of libraries and
    data must not count against the budget a second time; a failed trial keeps its verdict."""
    point = ProbePoint(8, 128, "bf16", False, False, 400.0, 2.5, resting_gb=0.5)
    assert within_budget(point, 2.2).fits and not within_budget(point, 1.9).fits
    assert within_budget(point, 1.9).note == "needs 2.0 GB > budget"
    failed = ProbePoint(16, 128, "bf16", False, False, note="out of memory")
    assert within_budget(failed, 100.0) == failed


def test_a_trial_predicted_to_overrun_the_time_budget_is_not_started():
    """A trial cannot be cut short (three training steps: minutes for a large model on a CPU),
    so the search predicts each from the speed measured so far and stops before one that
    would end past train.probe_seconds, saying so."""
    measure, calls = fake_measure(64, {8: 100, 16: 180})
    t = TrainSettings()
    rule = Decision("bf16", "auto", "rule")
    # 8 x 256 tokens at 200 tokens/s (bf16): a trial at 16 (4 steps long) would take ~82 s,
    # 30 are left
    _, micro, _, _ = decide_by_probe(t, GPU, rule, 64, 10_000, 256, measure, time.monotonic() + 30)
    assert [c[0] for c in calls] == [8] and micro.value == 8
    assert "16 not tried: its trial would take ~82 s, past train.probe_seconds" in micro.reason


def test_the_first_size_trial_runs_however_long_it_is_predicted_to_take():
    """On a bf16 CPU the precision comparison runs at ~2k tokens (micro-batch 2 of 1,024
    tokens); at its speed a trial at 8 would overrun the budget, but it still runs: the plan
    needs one measurement at the size it starts from. Growing past it would not."""
    measure, calls = fake_measure(64, {2: 100, 8: 100})
    rule = Decision("bf16", "auto", "rule")
    deadline = time.monotonic() + 60
    prec, micro, _, _ = decide_by_probe(
        TrainSettings(), CPU_BF16, rule, 16, 10_000, 1024, measure, deadline
    )
    assert calls == [(2, "fp32", False), (2, "bf16", False), (8, "bf16", False)]
    assert prec.value == "bf16" and micro.value == 8 and "16 not tried" in micro.reason


def test_a_first_trial_that_would_overrun_the_budget_plans_from_the_memory_model(
    config: Path, capsys, monkeypatch, tmp_path: Path
):
    """A trial cannot be cut short, and on a CPU the first one has no measured speed to be
    predicted from: its FLOPs at the CPU's measured layer speed stand in. Too slow (a large
    model on a CPU), and the plan comes from the memory model at once, saying why."""
    monkeypatch.setenv("TUNEPILOT_CACHE", str(tmp_path / "cache"))  # no probe cached yet
    monkeypatch.setattr(hardware, "cpu_layer_gflops", lambda dtype, size=512: 1e-6)
    plan = plan_json(capsys, config)
    assert plan["probe"] == {}
    assert plan["knobs"]["micro_batch_size"]["reason"].startswith("largest hardware-friendly")
    [warning] = [w for w in plan["warnings"] if "first trial" in w]
    assert "past train.probe_seconds (60)" in warning and "raise train.probe_seconds" in warning


def test_a_point_cached_here_is_measured_again_when_another_rank_lacks_it(
    config: Path, capsys, monkeypatch
):
    """Ranks on different machines have different probe caches. A trial's results are agreed
    over all ranks (collectives), so a rank that has the point cached must measure with the
    rest instead of waiting in a collective the others never reach."""
    plan_json(capsys, config, "train.max_length=128")  # cached here now
    monkeypatch.setattr(distributed, "all_ranks", lambda flag: False)  # another rank lacks it
    plan = plan_json(capsys, config, "train.max_length=128")
    assert plan["probe"]["cached"] is False and plan["probe"]["points"]
