"""Profile tunepilot's real training loop on the benchmark job: where a step's time goes.

Runs `tunepilot train` (the loop as users run it: guardian, clipping, logging) on the
long-tailed set of benchmarks/compare.py at its fixed settings, with torch.profiler stepping
once per optimizer step: the first four steps are left out (warm-up and the one-time gradient
audit), the rest recorded. Prints
the top operators by self time on the device (CUDA) or the CPU, and per recorded step the
scalar reads of tensors (`.item()`, `float()`, `.tolist()`: `aten::_local_scalar_dense`, each
a host-device synchronisation on a GPU), kernel launches, the step's wall time and, on a GPU,
the time its kernels kept the device busy: on a fast GPU a small model's step is bound by
launches and syncs, not by arithmetic, and busy / wall says how much.

With --python the same steps are recorded by cProfile instead: the Python functions that the
host spends a step in (tunepilot's, transformers', peft's, torch's Python layers), which is
what to shorten once busy / wall says the device waits on the host. cProfile slows Python
calls, so compare the functions with each other, not the wall time with an unprofiled run.

It runs under tcmalloc where the system has it, restarting itself as `tunepilot train` does
(``TUNEPILOT_ALLOCATOR=system`` keeps glibc's malloc).

    python benchmarks/profile_step.py [--model NAME_OR_DIR] [--method lora|full]
                                      [--precision bf16|fp32] [--compile] [--steps 8] [--rows 25]
                                      [--python]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from tunepilot.train.allocator import relaunch_with_tcmalloc, tcmalloc_loaded

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# steps left out of the profile: warm-up, and the gradient audit (train/checks.py), which reads
# every frozen tensor's fingerprint until a step after the first real update (by step 4 here)
WARMUP = 4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--method", default="lora", choices=("lora", "full"))
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--compile", action="store_true", help="train.compile=true")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rows", type=int, default=25, help="operators in the table")
    parser.add_argument("--python", action="store_true", help="cProfile the host's Python")
    args = parser.parse_args()
    if args.steps <= WARMUP:
        parser.error(f"--steps must be more than the {WARMUP} warm-up steps")
    # restarted with tcmalloc preloaded where installed, as `tunepilot train` restarts itself
    # (TUNEPILOT_ALLOCATOR=system profiles glibc's malloc instead): under glibc the profile
    # reads freshly mapped pages as copies and softmaxes (a full bf16 step on Zen 5: 3.3 s with
    # copy_ 13% under glibc, 2.7 s with copy_ 6% under tcmalloc; session 22)
    relaunch_with_tcmalloc()

    import compare
    import longtail
    from tunepilot.config import load_config

    work = Path(tempfile.mkdtemp(prefix="tunepilot-profile-"))
    spec = {
        "data": str(longtail.write(work / "train.jsonl", 512, seed=0)),
        "eval": str(work / "eval.jsonl"),
        "method": args.method,
        "precision": args.precision,
        "steps": args.steps,
        "model": args.model,
        "options": {"compile": args.compile},
    }
    Path(spec["eval"]).write_text('{"text": "held-out line."}\n')
    cfg = load_config(
        None, overrides=compare._overrides(spec, auto=False), output_dir=str(work / "run")
    )

    cuda = torch.cuda.is_available()
    if args.python:
        return _python_profile(cfg, work, args, cuda)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    recorded = args.steps - WARMUP
    with profile(
        activities=activities,
        schedule=schedule(wait=0, warmup=WARMUP, active=recorded, repeat=1),
        acc_events=True,
    ) as prof:
        ends = _train_ticking(cfg, work, cuda, lambda done: prof.step())

    events = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=args.rows))
    counts = {e.key: e.count for e in events}
    syncs = counts.get("aten::_local_scalar_dense", 0)
    launches = counts.get("cudaLaunchKernel", 0) + counts.get("cuLaunchKernel", 0)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    # the recorded steps' wall time, from the end of the last warm-up step (includes the
    # profiler's own overhead, so it is an upper bound)
    wall = (ends[-1] - ends[WARMUP - 1]) / recorded
    busy = ""
    if cuda:  # kernel time alone: self device time of the kernels, not of the ops that launch them
        kernels = sum(
            e.self_device_time_total
            for e in events
            if e.device_type.name == "CUDA" and not e.is_user_annotation
        )
        seconds = kernels / 1e6 / recorded
        busy = f", device busy {seconds * 1e3:.0f} ms ({seconds / wall:.0%} of the wall time)"
    malloc = "tcmalloc" if tcmalloc_loaded() else "the system's"
    print(
        f"{device}; {_job(args)}; per recorded step: "
        f"{wall * 1e3:.0f} ms wall{busy}, {syncs / recorded:.0f} scalar reads of tensors "
        "(.item(), float(), .tolist(): each a host-device sync on a GPU), "
        f"{launches / recorded:.0f} kernel launches; host malloc: {malloc}"
    )
    return 0


def _train_ticking(cfg, work: Path, cuda: bool, tick: Callable[[int], None]) -> list[float]:
    """Train ``cfg``, calling ``tick(steps done)`` as each optimizer step ends (its queued
    kernels included); returns the steps' end times. ``work`` is deleted afterwards."""
    from rich.console import Console

    from tunepilot.run import train
    from tunepilot.train import loop

    step = loop.apply
    ends: list[float] = []

    def apply_and_tick(*a, **k):  # the loop's optimizer update ends each step
        step(*a, **k)
        if cuda:
            torch.cuda.synchronize()  # the step's wall time includes its queued kernels
        ends.append(time.perf_counter())
        tick(len(ends))

    loop.apply = apply_and_tick
    try:
        train(cfg, Console(quiet=True), quiet=True)
    finally:
        loop.apply = step
        shutil.rmtree(work, ignore_errors=True)  # the run's weights: ~0.5 GB per profile
    return ends


def _python_profile(cfg, work: Path, args: argparse.Namespace, cuda: bool) -> int:
    """The recorded steps under cProfile: top functions by their own time, then by cumulative."""
    recorder = cProfile.Profile()

    def tick(done: int) -> None:
        if done == WARMUP:
            recorder.enable()
        elif done == args.steps:
            recorder.disable()

    try:
        ends = _train_ticking(cfg, work, cuda, tick)
    finally:
        recorder.disable()
    unprofiled = (ends[WARMUP - 1] - ends[0]) / (WARMUP - 1)
    profiled = (ends[-1] - ends[WARMUP - 1]) / (args.steps - WARMUP)
    stats = pstats.Stats(recorder)
    stats.sort_stats("tottime").print_stats(args.rows)
    stats.sort_stats("cumulative").print_stats(args.rows)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(
        f"{device}; {_job(args)}; per step: {unprofiled * 1e3:.0f} ms wall before recording "
        f"(steps 2-{WARMUP}), {profiled * 1e3:.0f} ms under cProfile"
    )
    return 0


def _job(args: argparse.Namespace) -> str:
    return f"{args.method} {args.precision}" + (" compiled" if args.compile else "")


if __name__ == "__main__":
    sys.exit(main())
