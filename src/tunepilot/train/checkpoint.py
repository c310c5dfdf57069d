"""Training state: captured in memory (cheap rollback) or written to disk (resume), exactly.

A checkpoint directory holds
  trainable.safetensors  the trainable weights (all weights for a full fine-tune)
  optimizer.pt           the optimizer's state dict (tensors only; loaded with weights_only=True)
  state.json             step, data position, scheduler/scaler/guardian state, RNG states
  manifest.json          sha256 of each file above, written last

It is written to a temporary directory, fsynced and renamed into place, so a crash leaves either
a whole checkpoint or none; a checkpoint whose manifest is missing or whose checksums do not
match is skipped in favour of the previous one. Nothing is ever unpickled from disk.

In a distributed run rank 0 alone reads and writes checkpoints. Their weights and optimizer
state are whole (an FSDP2-sharded model's are gathered to rank 0 first), and the RNG states of
every rank are kept, so a resumed run continues exactly.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunepilot import distributed
from tunepilot.errors import RunError

FILES = ("trainable.safetensors", "optimizer.pt", "state.json")


@dataclass
class Progress:
    """Where training stands; everything needed besides weights and optimizer moments."""

    step: int = 0  # optimizer updates applied
    position: int = 0  # global batches consumed from the data stream (skips included)
    micro_batch_size: int = 1
    precision: str = "fp32"
    lr_scale: float = 1.0  # the guardian lowers the learning rate by scaling the schedule
    skipped_positions: list[int] = field(default_factory=list)  # batches replayed without
    guardian: dict[str, Any] = field(default_factory=dict)


@dataclass
class Snapshot:
    """A training state held in memory: for rolling back a LoRA run without touching disk."""

    progress: Progress
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: dict[str, Any]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: p.detach().cpu().clone().contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
        # dropout on a GPU draws from the device's own generator
        "cuda": [g.tolist() for g in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available()
        else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    ranks = state.get("ranks", [])
    if len(ranks) == distributed.world() > 1:  # each rank continues its own random stream
        state = ranks[distributed.rank()]
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    cuda = state.get("cuda", [])  # absent in checkpoints written before it was saved
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(g, dtype=torch.uint8) for g in cuda])


def capture(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    progress: Progress,
) -> Snapshot:
    """The training state now. In a distributed run every rank must call it at the same time
    (shards and RNG states are gathered); under FSDP2 only rank 0's holds the weights."""
    rng = rng_state()
    if distributed.active():
        rng["ranks"] = distributed.gather_objects(rng_state())
    if distributed.sharded(model):
        weights, optim = distributed.full_state(model, optimizer)
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        weights = {k: v.contiguous() for k, v in weights.items() if k in trainable}
    else:
        weights, optim = trainable_state(model), copy.deepcopy(optimizer.state_dict())
    return Snapshot(
        copy.deepcopy(progress),
        weights,
        optim,
        scheduler.state_dict(),
        scaler.state_dict() if scaler else None,
        rng,
    )


def restore(
    snapshot: Snapshot,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
) -> Progress:
    if distributed.sharded(model):
        distributed.load_full_state(model, optimizer, snapshot.weights, snapshot.optimizer)
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in snapshot.weights.items():
                params[name].copy_(value)
        optimizer.load_state_dict(copy.deepcopy(snapshot.optimizer))
    scheduler.load_state_dict(snapshot.scheduler)
    if scaler and snapshot.scaler:
        scaler.load_state_dict(snapshot.scaler)
    set_rng_state(snapshot.rng)
    optimizer.zero_grad(set_to_none=True)
    return copy.deepcopy(snapshot.progress)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save(snapshot: Snapshot, run_dir: Path, keep: int = 2, debug_hook: Any = None) -> Path:
    """Write a snapshot atomically as checkpoints/step-N; keep the newest ``keep``."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{snapshot.progress.step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        save_file(snapshot.weights, str(tmp / "trainable.safetensors"))
        if debug_hook:
            debug_hook(snapshot.progress.step)  # fault injection: die or fail mid-write
        torch.save(snapshot.optimizer, tmp / "optimizer.pt")
        state = {
            "progress": asdict(snapshot.progress),
            "scheduler": snapshot.scheduler,
            "scaler": snapshot.scaler,
            "rng": snapshot.rng,
        }
        (tmp / "state.json").write_text(json.dumps(state))
        manifest = {}
        for name in FILES:
            _fsync(tmp / name)
            manifest[name] = _sha256(tmp / name)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / "manifest.json")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_valid(run_dir)
        kept = f"checkpoint {previous.name} is intact" if previous else "no earlier checkpoint"
        what = "disk full" if exc.errno == errno.ENOSPC else f"{exc.strerror or exc}"
        raise RunError(
            f"could not write checkpoint {target.name} ({what}); {kept}. Free space "
            "and run the same command again to resume"
        ) from None
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def verify(path: Path) -> str | None:
    """None when the checkpoint is whole; else what is wrong with it."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return "no readable manifest (interrupted write?)"
    for name in FILES:
        if not (path / name).is_file():
            return f"{name} missing"
        if _sha256(path / name) != manifest.get(name):
            return f"{name} checksum mismatch"
    return None


def latest_valid(run_dir: Path, report: Any = None) -> Path | None:
    """The newest whole checkpoint; broken ones are reported and passed over."""
    root = run_dir / "checkpoints"
    for path in sorted(root.glob("step-*"), reverse=True) if root.is_dir() else []:
        problem = verify(path)
        if problem is None:
            return path
        if report:
            report(f"checkpoint {path.name} is unusable ({problem}); trying the previous one")
    return None


def clean_partial(run_dir: Path) -> None:
    """Remove temporary directories left by a write that was killed."""
    root = run_dir / "checkpoints"
    for tmp in root.glob(".tmp-*") if root.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)


def load_shared(path: Path | None, model: nn.Module) -> Snapshot | None:
    """Rank 0 reads the checkpoint at ``path`` and every rank receives it (the nodes of a run
    need not share a disk). A sharded model's weights and optimizer state stay on rank 0:
    ``restore`` scatters them, instead of every rank holding a whole copy."""
    if not distributed.active():
        return load(path) if path else None
    if not distributed.sharded(model):
        return distributed.from_main(lambda: load(path) if path else None)
    local = load(path) if path and distributed.is_main() else None
    small = distributed.from_main(
        lambda: replace(local, weights={}, optimizer={}) if local else None
    )
    return local if distributed.is_main() else small


def load(path: Path) -> Snapshot:
    state = json.loads((path / "state.json").read_text())
    optimizer = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    return Snapshot(
        Progress(**state["progress"]),
        load_file(str(path / "trainable.safetensors")),
        optimizer,
        state["scheduler"],
        state["scaler"],
        state["rng"],
    )
