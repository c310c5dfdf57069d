"""A first-order memory model, and gradient checkpointing decided from it.

Rough by design (the autopilot issue replaces it with a measured probe): it counts weights,
gradients and AdamW state exactly, and activations with a per-layer constant per token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from tunepilot.plan.decision import AUTO_SOURCE, Decision, given, user

GB = 2**30
#: bytes of saved activations per token per layer, in units of hidden_size x element size;
#: ~34 for a standard block (attention + MLP inputs, norms, softmax stats) without checkpointing
ACT_FACTOR = 34
CKPT_FACTOR = 2  # with checkpointing only each layer's input survives


@dataclass(frozen=True)
class ModelShape:
    total_params: int
    trainable_params: int
    hidden_size: int
    num_layers: int
    vocab_size: int
    context: int


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gb: float
    gradients_gb: float
    optimizer_gb: float
    activations_gb: float
    total_gb: float

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in asdict(self).items()}


def estimate(
    shape: ModelShape, micro_batch: int, max_length: int, precision: str, checkpointing: bool
) -> MemoryEstimate:
    act_bytes = 4 if precision == "fp32" else 2
    weights = shape.total_params * 4  # fp32 master weights
    grads = shape.trainable_params * 4
    adam = shape.trainable_params * 8  # exp_avg + exp_avg_sq
    tokens = micro_batch * max_length
    factor = CKPT_FACTOR if checkpointing else ACT_FACTOR
    acts = tokens * shape.hidden_size * act_bytes * factor * shape.num_layers
    if checkpointing:  # one layer is recomputed at a time with its full activations
        acts += tokens * shape.hidden_size * act_bytes * ACT_FACTOR
    # logits exist only for supervised positions (at most all tokens), in fp32 for the loss
    logits = tokens * shape.vocab_size * 4 * 2
    parts = [weights / GB, grads / GB, adam / GB, (acts + logits) / GB]
    return MemoryEstimate(*parts, sum(parts))


def budget_gb(memory_available_gb: float) -> float:
    """What training may use: 80% of what is free now, leaving room for the OS and loaders."""
    return 0.8 * memory_available_gb


def decide_gradient_checkpointing(
    setting: Any,
    shape: ModelShape,
    micro_batch: int,
    max_length: int,
    precision: str,
    budget: float,
) -> Decision:
    if given(setting):
        return user(setting)
    need = estimate(shape, micro_batch, max_length, precision, False).total_gb
    if need <= budget:
        return Decision(
            False,
            AUTO_SOURCE,
            f"estimated peak {need:.1f} GB fits the "
            f"{budget:.1f} GB budget without it; recomputation would cost ~30% speed",
        )
    return Decision(
        True,
        AUTO_SOURCE,
        f"estimated peak {need:.1f} GB exceeds the {budget:.1f} GB "
        "budget; recomputing activations trades ~30% speed for memory",
    )
