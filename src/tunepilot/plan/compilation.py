"""Whether to compile the decoder layers' feed-forward and norm modules with torch.compile.

Measured on the 2-core benchmark CPU (SmolLM2-135M, packed steps; GAIN below), after ~10 s of
compiling with a cold cache. What it fuses is element-wise work (norms, activations, residual
adds, casts), so it pays at bf16, where the matmuls are fast and that work is a large share of
a step, and hardly at fp32, where the matmuls already run near the peak. Attention stays eager
(packed rows change shape every step and run their own per-sequence path). Compiling pays only
when the run is long enough to win its cost back, so ``auto`` weighs the run's predicted time
(from the probe) against it.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from tunepilot.plan.decision import AUTO_SOURCE, Decision, given, user

# tokens/s gained, the lower end of what was measured: benchmarks/compare.py (16 steps, 2 rounds)
# gave bf16 full +9.5%, bf16 LoRA +17%, fp32 LoRA +6%, fp32 full +1%; the profiling harness and
# the demo gave bf16 LoRA +8-15%. Since the hand-written RMSNorm and the shared projections made
# the eager step faster (session 8, benchmarks/results/2026-11-27-compile-after-norms.txt):
# bf16 full +2%, bf16 LoRA +9%. On the Zen 5 machine kind over 40 steps, 2 rounds (session 22,
# benchmarks/results/2026-12-07-compile-bf16-40steps-zen5-s22.txt): bf16 full +0.4% and +1.1%,
# bf16 LoRA +9% and +13%
GAIN = {
    ("bf16", "full"): 0.01,
    ("bf16", "lora"): 0.08,
    ("fp32", "lora"): 0.06,
    ("fp32", "full"): 0.01,
}
COST_S = 30.0  # ~10 s for the training graphs, once more for no-grad evaluation, with margin


def compiler_available() -> bool:
    """torch.compile's CPU backend (inductor) builds C++: it needs a compiler on the PATH."""
    names = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    return any(shutil.which(name) for name in names if name)


def decide_compile(
    setting: Any,
    device: str,
    processes: int,
    predicted_s: float | None,
    precision: str = "bf16",
    method: str = "lora",
    fp32_matmul: str = "default",
) -> Decision:
    """``predicted_s``: the run's training time from the probe's step time, None without one;
    ``fp32_matmul``: the library fp32 products run on here (hardware.Hardware)."""
    if given(setting):
        return user(bool(setting))
    if device != "cpu":
        # an H100, LoRA at bf16 (benchmarks/results/2026-11-27-h100.txt): 9% fewer tokens/s
        # compiled, after ~90 s of compiling; a small model's GPU step is bound by launches and
        # Python, and the packed rows' changing shapes keep the compiled graphs general
        return Decision(
            False,
            AUTO_SOURCE,
            "measured 9% slower on an H100 (LoRA, bf16); set train.compile: true to try it here",
        )
    if processes > 1:
        return Decision(False, AUTO_SOURCE, "not combined with distributed training yet")
    if not compiler_available():
        return Decision(
            False, AUTO_SOURCE, "no C++ compiler found (torch.compile needs one on CPU)"
        )
    if precision == "fp32" and fp32_matmul == "onednn":
        # compiled modules compute their projections the compiler's way (MKL's at fp32); the
        # eager ones run on oneDNN, at twice MKL's speed on the CPU that measured it so
        return Decision(
            False,
            AUTO_SOURCE,
            "fp32 products run on oneDNN here, faster than compiled modules' would "
            "(compiling measured at most +6% at fp32)",
        )
    if predicted_s is None:
        return Decision(
            False,
            AUTO_SOURCE,
            f"no step time measured (probe skipped) to weigh ~{COST_S:.0f} s of compiling against",
        )
    gain = GAIN.get((precision, method), 0.0)
    saved = gain * predicted_s
    minutes = f"~{predicted_s / 60:.0f} min" if predicted_s >= 60 else f"~{predicted_s:.0f} s"
    if saved < COST_S:
        return Decision(
            False,
            AUTO_SOURCE,
            f"run predicted at {minutes}: +{gain:.0%} ({method} at {precision}) would save "
            f"~{saved:.0f} s, less than ~{COST_S:.0f} s of compiling",
        )
    return Decision(
        True,
        AUTO_SOURCE,
        f"run predicted at {minutes}: compiling the feed-forward and norm modules "
        f"(~{COST_S:.0f} s) saves ~{saved:.0f} s (measured +{gain:.0%} tokens/s for {method} "
        f"at {precision})",
    )
