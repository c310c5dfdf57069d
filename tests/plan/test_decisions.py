"""Single decisions on fake hardware and known data: value and reason."""

import pytest
import torch

from tunepilot.data.tokenize import Tokenized
from tunepilot.errors import UserError
from tunepilot.hardware import Hardware
from tunepilot.plan import compilation
from tunepilot.plan.batch import decide_global_batch, decide_micro_batch
from tunepilot.plan.length import decide_max_length, truncation
from tunepilot.plan.memory import ACT_BYTES, ModelShape, estimate
from tunepilot.plan.padding import decide_packing, decide_pad_token
from tunepilot.plan.precision import decide_precision
from tunepilot.plan.schedule import decide_warmup
from tunepilot.plan.steps import decide_epochs, decide_steps


def hw(device="cpu", bf16=False, cc=None, mem=16.0) -> Hardware:
    return Hardware(device, "fake", mem, mem, 2, bf16, "fake reason", cc)


A100 = hw("cuda", True, (8, 0), 80)
H100 = hw("cuda", True, (9, 0), 80)
V100 = hw("cuda", False, (7, 0), 32)
T4 = hw("cuda", False, (7, 5), 16)
SHAPE = ModelShape(135_000_000, 5_000_000, 576, 30, 49152, 8192)


@pytest.mark.parametrize(
    ("hardware", "expected"),
    [(A100, "bf16"), (T4, "fp16"), (hw(bf16=True), "bf16"), (hw(bf16=False), "fp32")],
)
def test_auto_precision(hardware, expected):
    decision, warnings = decide_precision("auto", hardware)
    assert decision.value == expected and decision.source == "auto" and decision.reason
    assert warnings == []


def test_user_bf16_without_support_warns():
    decision, warnings = decide_precision("bf16", T4)
    assert decision.value == "bf16" and decision.source == "user" and warnings


def speeds(**gflops):
    """A fake layer timer: GFLOP/s per dtype name; records which dtypes were timed."""
    timed = []

    def speed(dtype):
        name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        timed.append(name)
        return gflops[name]

    speed.timed = timed
    return speed


@pytest.mark.parametrize(
    ("setting", "native_bf16", "remedy"),
    [
        ("fp16", True, "set train.precision to bf16 (native on this CPU), fp32 or auto"),
        ("fp16", False, "set train.precision to fp32 or auto"),
        ("bf16", False, "set train.precision to fp32 or auto"),
    ],
)
def test_user_half_precision_a_cpu_only_emulates_is_refused(setting, native_bf16, remedy):
    slow = speeds(fp32=200.0, bf16=15.0, fp16=15.0)
    with pytest.raises(UserError) as err:
        decide_precision(setting, hw(bf16=native_bf16), slow)
    message = str(err.value)
    assert message.startswith(f"train.precision: {setting} on this CPU trains 13x slower")
    assert "15 vs 200 GFLOP/s" in message and message.endswith(remedy)


def test_user_half_precision_close_to_fp32_is_kept_with_a_warning():
    fast_enough = speeds(fp32=200.0, fp16=60.0)  # 3.3x: slower, not refused
    decision, warnings = decide_precision("fp16", hw(bf16=True), fast_enough)
    assert decision.value == "fp16" and decision.source == "user"
    assert warnings and "fp16 on a CPU is slow" in warnings[0]
    assert fast_enough.timed == ["fp16", "fp32"]


def test_precision_the_hardware_runs_natively_is_not_timed():
    never = speeds()  # any timing would raise KeyError
    assert decide_precision("bf16", hw(bf16=True), never)[0].value == "bf16"
    assert decide_precision("fp32", hw(), never)[0].value == "fp32"
    assert decide_precision("fp16", T4, never)[0].value == "fp16"
    assert decide_precision("auto", hw(), never)[0].value == "fp32"
    assert never.timed == []


@pytest.mark.parametrize("gpu", [A100, H100, V100, T4])
def test_gpu_profiles_get_hardware_friendly_batches(gpu):
    d = decide_micro_batch(
        "auto", gpu, SHAPE, 1024, "bf16", False, 0.8 * gpu.memory_total_gb, 100_000, 64
    )
    assert d.value in (1, 2, 4) or d.value % 8 == 0
    assert 64 % d.value == 0 and d.value <= 64


def test_micro_batch_is_hardware_friendly_and_divides_global():
    d = decide_micro_batch("auto", A100, SHAPE, 512, "bf16", False, 60, 10_000, 48)
    assert d.value in (1, 2, 4) or d.value % 8 == 0
    assert 48 % d.value == 0
    assert decide_micro_batch("auto", hw(), SHAPE, 128, "fp32", False, 12, 1000, 16).value <= 16


def test_micro_batch_that_cannot_fit_is_an_error():
    with pytest.raises(UserError, match=r"over the 0\.10 GB budget"):
        decide_micro_batch("auto", hw(), SHAPE, 512, "fp32", False, 0.1, 100, None)


def test_memory_model_monotone():
    sizes = [estimate(SHAPE, b, 256, "bf16", False).total_gb for b in (1, 2, 4, 8)]
    assert sizes == sorted(sizes)
    assert estimate(SHAPE, 8, 256, "bf16", True).total_gb < sizes[-1]


def test_memory_model_counts_half_copies_and_one_chunk_of_logits():
    fp32, bf16 = (estimate(SHAPE, 8, 256, p, False) for p in ("fp32", "bf16"))
    # autocast's (or train/frozen.py's) bf16 copies of every Linear weight, not the embeddings
    linears = SHAPE.total_params - SHAPE.vocab_size * SHAPE.hidden_size
    assert (bf16.weights_gb - fp32.weights_gb) * 2**30 == pytest.approx(linears * 2)
    # past one chunk of positions the loss adds nothing per token: no tokens x vocabulary term
    one, two = (estimate(SHAPE, b, 1024, "bf16", False).activations_gb for b in (1, 2))
    per_token = (two - one) * 2**30 / 1024
    assert per_token == pytest.approx(SHAPE.hidden_size * SHAPE.num_layers * ACT_BYTES["half"])


def test_global_batch_shrinks_for_small_data_and_grows_for_large():
    assert decide_global_batch("auto", 400, 1.0).value == 8
    # the reason tells the truth when even the floor cannot give ~100 steps
    few = decide_global_batch("auto", 400, 1.0).reason
    assert few.startswith("8, the smallest chosen: 400 examples x 1 epochs make only ~50 ")
    demo = decide_global_batch("auto", 1280, 1.0).reason
    assert demo == "8, so that training gets at least ~100 optimizer steps"
    assert decide_global_batch("auto", 50_000, 1.0).value == 32
    assert decide_global_batch(24, 400, 1.0).source == "user"


def test_max_steps_overrides_epochs():
    epochs = decide_epochs(3.0, 1000)
    max_steps, total, _ = decide_steps(epochs, 50, 1000, 16)
    assert max_steps.source == "user"
    assert total.value == 50 and "max_steps governs" in total.reason
    _, total, _ = decide_steps(epochs, -1, 1000, 16)
    assert total.value == 3 * 63 and "num_epochs governs" in total.reason


def test_warmup_conflict_is_flagged():
    decision, warnings = decide_warmup(20, "auto", 10)
    assert decision.value == 20 and warnings and "never reaches its peak" in warnings[0]
    decision, _ = decide_warmup("auto", 0.1, 95)
    assert decision.value == 10


def test_max_length_from_data_and_truncation_counts():
    examples = [
        Tokenized([1] * n, [False] * (n // 2) + [True] * (n - n // 2), n // 2, None, f"x:{n}")
        for n in (10, 70, 130)
    ]
    assert decide_max_length("auto", examples, 8192).value == 192
    t = truncation(examples, 64)
    assert (t.examples, t.tokens) == (2, 6 + 66)
    # the 130-token example is supervised from index 65: all 65 targets lie past the cut
    assert t.supervised_tokens == 6 + 65 and t.emptied == 1


class FakeTokenizer:
    def __init__(self, pad, eos, unk, bos="<s>"):
        self.pad_token, self.eos_token, self.unk_token, self.bos_token = pad, eos, unk, bos
        self.all_special_tokens = [t for t in (pad, eos, unk, bos) if t]


def test_pad_token_never_aliases_eos():
    assert decide_pad_token(FakeTokenizer("<pad>", "</s>", "<unk>")).value == "<pad>"
    assert decide_pad_token(FakeTokenizer("</s>", "</s>", "<unk>")).value == "<unk>"
    d = decide_pad_token(FakeTokenizer(None, "</s>", None))
    assert d.value == "<|pad|>" and "adding" in d.reason


def _examples(lengths_and_supervised):
    return [
        Tokenized([1] * n, [False] * (n - s) + [True] * s, n - s, None, f"x:{i}")
        for i, (n, s) in enumerate(lengths_and_supervised)
    ]


def test_max_length_keeps_99_percent_when_little_signal_is_lost():
    examples = _examples([(50, 10)] * 199 + [(500, 10)])
    d = decide_max_length("auto", examples, 8192)
    assert d.value == 64 and "99%" in d.reason and "1 examples" in d.reason


def test_max_length_keeps_everything_when_truncation_would_lose_signal():
    examples = _examples([(50, 10)] * 199 + [(500, 400)])
    d = decide_max_length("auto", examples, 8192)
    assert d.value == 512 and "training signal" in d.reason


def test_a_max_length_that_cuts_away_every_target_is_an_error_naming_the_fix():
    """Long prompts with answers past the cut: every batch would be empty. Said before the
    probe runs, with the length that keeps something."""
    examples = _examples([(300, 10), (400, 20)])  # targets from token 291 and 381
    with pytest.raises(UserError) as err:
        decide_max_length(256, examples, 8192)
    message = str(err.value)
    assert message.startswith("x: cut to max_length 256, every one of its 2 training examples")
    assert "token 291" in message and "at least 320, or set it to auto" in message
    assert decide_max_length(320, examples, 8192).value == 320  # one keeps targets: a warning
    with pytest.raises(UserError, match="the model's context is 256 tokens"):
        decide_max_length("auto", examples, 256)  # auto capped by a short context
    assert decide_max_length(256, examples + _examples([(40, 5)]), 8192).value == 256


def test_a_hand_set_rate_far_from_the_rule_is_warned_about():
    """5 for 5e-5 is the slip this catches; lr-find's picks (3e-3 on the demo) pass."""
    from tunepilot.plan.lr import check_rate

    (above,) = check_rate(5.0, 1.41e-4, "lora")
    assert above.startswith("learning_rate 5 is 35,461x the rule's 0.000141") and "diverge" in above
    (below,) = check_rate(1e-9, 5e-5, "full")
    assert below.startswith("learning_rate 1e-09 is 1/50,000 of the rule's 5e-05 for this full")
    assert check_rate(3e-3, 1.41e-4, "lora") == [] and check_rate(1e-6, 5e-5, "full") == []


def test_learning_rate_scales_with_sqrt_of_global_batch():
    from tunepilot.plan.lr import decide_learning_rate

    assert decide_learning_rate("auto", "lora", 10**8, 16, 4096).value == pytest.approx(2e-4)
    assert decide_learning_rate("auto", "lora", 10**8, 64, 4096).value == pytest.approx(4e-4)
    d = decide_learning_rate("auto", "full", 10**8, 4, 4096)
    assert d.value == pytest.approx(2.5e-5) and "sqrt(4/16)" in d.reason


def test_lora_learning_rate_grows_as_the_model_narrows():
    """width^-0.781 from 4,096 wide: the demo's 576-wide SmolLM2 at global batch 8 gets 6.55e-4,
    where 1.41e-4 (the unscaled rule) reached 47/120 exact and 4-8x that 114-119/120."""
    from tunepilot.plan.lr import decide_learning_rate

    demo = decide_learning_rate("auto", "lora", 134_515_008, 8, 576)
    assert demo.value == pytest.approx(6.55e-4)
    assert "(4096/576)^0.781 = 0.000926 for this 576-wide model" in demo.reason
    assert "sqrt(8/16)" in demo.reason
    tiny = decide_learning_rate("auto", "lora", 10**6, 16, 16)
    assert tiny.value == pytest.approx(2e-4 * 8**0.781, rel=1e-2)
    assert "16-wide model, scaled as if 512 wide" in tiny.reason
    wide = decide_learning_rate("auto", "lora", 70 * 10**9, 16, 8192).value
    assert wide == pytest.approx(2e-4 * 0.5**0.781, rel=1e-2)  # wider than 7B: smaller steps
    # a full fine-tune's rule is unchanged by width (not measured here)
    assert decide_learning_rate("auto", "full", 10**8, 16, 576).value == pytest.approx(5e-5)
    assert decide_learning_rate("auto", "full", 10**8, 16, 4096).value == pytest.approx(5e-5)


def test_packing_auto_follows_model_support_and_names_the_kernel():
    on = decide_packing("auto", True, False)
    assert on.value is True and on.source == "auto" and "SDPA call per example" in on.reason
    gpu = decide_packing("auto", True, True)
    assert "flash-attention" in gpu.reason
    torch_kernel = decide_packing("auto", True, False, varlen=True)
    assert torch_kernel.value is True and "PyTorch's varlen" in torch_kernel.reason
    off = decide_packing("auto", False, False)
    assert off.value is False and "sorted by length" in off.reason
    assert decide_packing(False, True, False).value is False


def test_packing_forced_on_an_unsupported_model_is_an_error():
    with pytest.raises(UserError, match=r"train\.packing"):
        decide_packing(True, False, False)


@pytest.mark.parametrize(
    ("device", "processes", "predicted_s", "expected", "said"),
    [
        ("cpu", 1, 20 * 60, True, "saves ~96 s"),
        ("cpu", 1, 60, False, "less than ~30 s of compiling"),
        ("cpu", 1, None, False, "probe skipped"),
        ("cpu", 2, 20 * 60, False, "distributed"),
        ("cuda", 1, 20 * 60, False, "slower on an H100"),
    ],
)
def test_compile_pays_only_on_long_cpu_runs(device, processes, predicted_s, expected, said):
    decision = compilation.decide_compile("auto", device, processes, predicted_s)
    assert decision.value is expected and decision.source == "auto" and said in decision.reason


def test_compile_weighs_the_gain_measured_for_the_precision_and_method():
    # 20 minutes: bf16 LoRA (+8%) saves ~96 s; bf16 full and fp32 full (+1% each) ~12 s, less
    # than compiling; an hour of bf16 full saves ~36 s, half an hour ~18 s
    assert compilation.decide_compile("auto", "cpu", 1, 20 * 60, "bf16", "lora").value is True
    full = compilation.decide_compile("auto", "cpu", 1, 20 * 60, "bf16", "full")
    assert full.value is False and "+1% (full at bf16) would save ~12 s" in full.reason
    assert compilation.decide_compile("auto", "cpu", 1, 3600, "bf16", "full").value is True
    assert compilation.decide_compile("auto", "cpu", 1, 1800, "bf16", "full").value is False
    fp32 = compilation.decide_compile("auto", "cpu", 1, 20 * 60, "fp32", "full")
    assert fp32.value is False and "+1% (full at fp32) would save ~12 s" in fp32.reason
    assert compilation.decide_compile("auto", "cpu", 1, 20 * 60, "fp32", "lora").value is True
    assert compilation.decide_compile("auto", "cpu", 1, 10**6, "fp16", "full").value is False
    # fp32 products on oneDNN (train/matmul.py) would go back to the compiler's own
    onednn = compilation.decide_compile("auto", "cpu", 1, 10**6, "fp32", "lora", "onednn")
    assert onednn.value is False and "oneDNN" in onednn.reason
    assert compilation.decide_compile("auto", "cpu", 1, 10**6, "bf16", "lora", "onednn").value


def test_compile_needs_a_cpp_compiler(monkeypatch):
    monkeypatch.setattr(compilation.shutil, "which", lambda name: None)
    decision = compilation.decide_compile("auto", "cpu", 1, 3600)
    assert decision.value is False and "no C++ compiler" in decision.reason
    assert compilation.decide_compile(True, "cpu", 1, None).value is True  # the user decides


def test_evaluations_during_training_are_as_many_as_a_tenth_of_its_time_allows():
    from tunepilot.plan.plan import _eval_every, _eval_seconds

    assert _eval_every(7, 160, 2.5, 14.0).source == "user"
    assert _eval_every("auto", 6, 2.5, 14.0).value == 0  # too short to evaluate in between
    # nothing measured: three evaluations, at 40, 80 and 120 of 160 steps
    assert _eval_every("auto", 160, None, None).value == 40
    # the demo: 14 s each against 400 s of training, so 2 (7%); at 4 s each, 3 (3%)
    demo = _eval_every("auto", 160, 2.5, 14.0)
    assert demo.value == 54 and "2 evaluations during training" in demo.reason
    assert "~14 s against ~400 s" in demo.reason and "7% of it" in demo.reason
    assert _eval_every("auto", 160, 2.5, 4.0).value == 40
    # a large eval set: before and after training only, and the reason says why
    big = _eval_every("auto", 160, 2.5, 60.0)
    assert big.value == 0 and "~60 s against ~400 s" in big.reason and "10%" in big.reason
    # a forward pass is a third of a full fine-tune's step, half of LoRA's (frozen weights)
    probe = {"tokens_per_s": 400.0}
    assert _eval_seconds(12_000, probe, "full") == pytest.approx(10.0)
    assert _eval_seconds(12_000, probe, "lora") == pytest.approx(15.0)
    assert _eval_seconds(12_000, {}, "lora") is None  # no probe, no prediction


def test_save_every_says_how_many_checkpoints_this_run_writes():
    from tunepilot.config import AUTO
    from tunepilot.plan.plan import _save_every

    short = _save_every(AUTO, 3, "lora")
    assert short.value == 1 and short.reason.startswith("every step (3 in 3 steps;")
    long = _save_every(AUTO, 100, "full")
    assert long.value == 25 and long.reason.startswith("every 25 steps (4 in 100 steps;")
