"""Measure instead of guess: real forward + backward + optimizer steps at the planned shape.

The probe answers three questions with measurements on the actual model and hardware:
- precision on a bf16-capable CPU: is bf16 autocast really faster than fp32 here, and does the
  loss agree?
- micro-batch: which hardware-friendly size fits the memory budget (peak RSS on CPU, CUDA peak
  allocation on GPU, a failed allocation either way: ``hardware.out_of_memory``) and runs the
  most tokens/s?
- gradient checkpointing: is it needed to fit at all?

Candidates grow from 8 while they fit and get faster, then bisect between the last size that
fitted and the first that did not. A time budget bounds the search; results are cached per
(model, shape, hardware) so the next plan is instant. Every process of a distributed run takes
the minimum over ranks (``distributed.agree_min``), so all ranks decide identically.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from tunepilot.data.batching import IGNORE, Batch, pack
from tunepilot.data.tokenize import Tokenized
from tunepilot.hardware import out_of_memory, reset_peak_memory, resident_bytes
from tunepilot.train.allocator import training_memory
from tunepilot.train.attention import heaviest_length
from tunepilot.train.optim import build_optimizer, build_scheduler
from tunepilot.train.step import accumulate, update

CANDIDATES = (1, 2, 4, 8, 16, 24, 32, 48, 64)
START = 8
MIN_GAIN = 0.03  # a larger micro-batch must be at least 3% faster to be worth its memory
# steps timed per trial after its warm-up step; the fastest counts. One step alone read
# +-15% from run to run on a CPU, and a slow one (347 tokens/s against 502-678 in other cold
# probes of the demo) predicted a run long enough to turn torch.compile on (session 23)
TIMED_STEPS = 2


@dataclass(frozen=True)
class ProbePoint:
    micro_batch: int
    max_length: int
    precision: str
    checkpointing: bool
    fits: bool
    tokens_per_s: float = 0.0
    peak_gb: float = 0.0
    loss: float = 0.0
    note: str = ""
    # of peak_gb, what the process held before the model loaded (libraries, tokenizer, data):
    # not training state, so the memory model leaves it out; 0 on CUDA, whose peak is tensors
    resting_gb: float = 0.0


@dataclass
class ProbeResult:
    points: list[ProbePoint] = field(default_factory=list)
    seconds: float = 0.0
    cached: bool = False

    def to_dict(self) -> dict:
        return {
            "points": [asdict(p) for p in self.points],
            "seconds": round(self.seconds, 1),
            "cached": self.cached,
        }


class _PeakRSS:
    """Samples this process's resident memory while a step runs (ru_maxrss never goes down)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes())
            self._stop.wait(0.005)

    def __enter__(self) -> _PeakRSS:
        self.peak = resident_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


def _synthetic_batch(
    micro: int, length: int, vocab: int, packing: bool, seed: int = 0, piece: int | None = None
) -> Batch:
    """Worst case: every example at max_length, every token supervised (largest logits);
    packed into one row when training packs, so the probe times the path training takes. A
    packed row's examples are cut into sequences of ``piece`` tokens where shorter sequences
    hold more memory per token than max_length ones (attention.heaviest_length)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (micro, length), generator=g)
    if packing:
        rows = [
            Tokenized(part.tolist(), [True] * len(part), 0, None, "probe")
            for r in ids
            for part in r.split(piece or length)
        ]
        return pack(rows, length)
    labels = ids.clone()
    labels[:, 0] = IGNORE
    n = micro * length
    return Batch(ids, torch.ones_like(ids), labels, n - micro, n, n)


def measure(
    model: nn.Module,
    micro: int,
    length: int,
    precision: str,
    checkpointing: bool,
    device: str,
    vocab: int,
    budget_gb: float,
    fault: Callable[[int], None] | None = None,
    packing: bool = False,
) -> ProbePoint:
    """Real training steps at this shape: one to warm up, then ``TIMED_STEPS`` timed, of which
    the fastest counts; weights restored after."""
    # training mode, as the loop trains: a model fresh from from_pretrained is in eval mode,
    # where transformers skips gradient checkpointing (and dropout)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    optimizer = build_optimizer(model, 1e-7, 0.0, device)
    scheduler = build_scheduler(optimizer, "constant", 0, 10)
    piece = heaviest_length(length, precision, device)
    batch = _synthetic_batch(micro, length, vocab, packing, piece=piece)
    point: ProbePoint
    # the allocator training runs under, entered per trial: it times the steps as training
    # takes them, and its trim on entry hands back what earlier trials freed, which would
    # otherwise stay resident and count in this trial's peak (a 4 x 1024 trial of the full
    # bf16 fine-tune read 8.3 GB alone and 13.0 GB after an 8 x 1024 one)
    with training_memory(device):
        reset_peak_memory(device)  # CUDA's peak is read below; on CPU the sampler's is
        try:
            if fault:
                fault(micro)
            with _PeakRSS() as rss:
                loss, _ = accumulate(model, [batch], precision, device, None)
                update(params, optimizer, scheduler, None, 1.0)
                seconds = float("inf")
                for _ in range(TIMED_STEPS):
                    tick = time.perf_counter()
                    loss, _ = accumulate(model, [batch], precision, device, None)
                    update(params, optimizer, scheduler, None, 1.0)
                    seconds = min(seconds, time.perf_counter() - tick)
            peak = (torch.cuda.max_memory_allocated() if device == "cuda" else rss.peak) / 2**30
            measured = ProbePoint(
                micro,
                length,
                precision,
                checkpointing,
                True,
                batch.real_tokens / seconds,
                round(peak, 3),
                loss,
            )
            point = within_budget(measured, budget_gb)
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            if not out_of_memory(exc):
                raise
            point = ProbePoint(micro, length, precision, checkpointing, False, note="out of memory")
        finally:
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for p, value in zip(params, saved, strict=True):
                    p.copy_(value)
            del optimizer, scheduler, batch
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    return point


def within_budget(point: ProbePoint, budget_gb: float) -> ProbePoint:
    """``point`` judged against the memory budget, which bounds what training adds: on a CPU
    the measured peak is the whole process's, so what it held before the model loaded is
    left out (it is already in use when the budget is taken from the free memory)."""
    if point.peak_gb <= 0:  # not measured: a failed trial keeps its verdict
        return point
    added = point.peak_gb - point.resting_gb
    fits = added <= budget_gb
    return replace(point, fits=fits, note="" if fits else f"needs {added:.1f} GB > budget")


#: a trial's wall time in steady steps: the warm-up step, the timed ones, and the weights' copy
#: and restore around them
TRIAL_STEPS = 2 + TIMED_STEPS


class ProbeTooSlow(Exception):
    """The probe's first trial, predicted before it starts, would end past its time budget;
    ``reason`` says by how much and what to do."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Search:
    """The micro-batch search's answer: the fastest size that fits (None if none did), and the
    size it did not try because that trial was predicted to end past the time budget."""

    best: ProbePoint | None
    not_tried: int | None = None
    not_tried_seconds: float = 0.0


def trial_seconds(micro: int, ref: ProbePoint) -> float:
    """A trial's predicted wall time from a measured point's speed (a larger micro-batch runs
    at least as many tokens per second, so this errs long)."""
    return TRIAL_STEPS * micro * ref.max_length / max(ref.tokens_per_s, 1e-9)


def search_micro_batch(
    run: Callable[[int], ProbePoint], sizes: list[int], deadline: float
) -> Search:
    """Grow (doubling) from 8 while sizes fit and get faster, then bisect between the best size
    and the first that failed or slowed down. Returns the fastest size that fits.

    The first size always runs (without it the plan would rest on no measurement at its
    shape: on the full bf16 benchmark job, 8 x 1,024 tokens ran 13% faster than the 2 x 1,024
    of the precision comparison). After it, a trial predicted from the best point's speed to
    end past ``deadline`` is not started: a trial is three training steps, minutes each for a
    large model on a CPU, and cannot be cut short."""
    if not sizes:
        return Search(None)

    def stop_before(micro: int, best: ProbePoint) -> Search | None:
        """The search's answer if a trial at ``micro`` would end past the deadline."""
        seconds = trial_seconds(micro, best)
        return None if time.monotonic() + seconds <= deadline else Search(best, micro, seconds)

    start = max([s for s in sizes if s <= START], default=sizes[0])
    best = run(start)
    if not best.fits:  # shrink until something fits: smaller trials are quicker
        smaller = [s for s in sizes if s < start]
        while smaller and not best.fits:
            best = run(smaller.pop())
        return Search(best if best.fits else None)
    ceiling = None  # first size above best that failed or was not faster
    while True:
        bigger = [s for s in sizes if s >= 2 * best.micro_batch] or [
            s for s in sizes if s > best.micro_batch
        ]
        if not bigger:
            break
        if stop := stop_before(bigger[0], best):
            return stop
        point = run(bigger[0])
        if point.fits and point.tokens_per_s >= best.tokens_per_s * (1 + MIN_GAIN):
            best = point
        else:
            ceiling = bigger[0]
            break
    while ceiling is not None:
        between = [s for s in sizes if best.micro_batch < s < ceiling]
        if not between:
            break
        middle = between[len(between) // 2]
        if stop := stop_before(middle, best):
            return stop
        point = run(middle)
        if point.fits and point.tokens_per_s >= best.tokens_per_s * (1 + MIN_GAIN):
            best = point
        else:
            ceiling = middle
    return Search(best)


# bumped when what a probe measures changes for the same model and machine (the synthetic
# batch, the attention paths, a full fine-tune's checkpointing trials that ran without it),
# so results cached by older code are measured again
MEASURE_VERSION = 4


def cache_key(parts: dict) -> str:
    parts = {**parts, "measure": MEASURE_VERSION}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_cached(root: Path, key: str) -> ProbeResult | None:
    path = root / "probes" / f"{key}.json"
    try:
        data = json.loads(path.read_text())
        points = [ProbePoint(**p) for p in data["points"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return ProbeResult(points, data.get("seconds", 0.0), cached=True)


def store_cached(root: Path, key: str, result: ProbeResult) -> None:
    path = root / "probes" / f"{key}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result.to_dict()))
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs time next run
