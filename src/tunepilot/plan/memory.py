"""A first-order memory model, and gradient checkpointing decided from it.

Rough by design (the autopilot issue replaces it with a measured probe): it counts weights
(with their half-precision copies under autocast), gradients and AdamW state exactly, and
activations with a per-layer constant per token. It counts training state, not the process
around it (interpreter, libraries, tokenizer, data): the probe measures that part apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from tunepilot.plan.decision import AUTO_SOURCE, Decision, given, user
from tunepilot.train.cross_entropy import CHUNK

GB = 2**30
#: bytes of saved activations per token per layer and unit of hidden_size. Under autocast a
#: standard block's ~34 tensors' worth at 2 bytes (the norms' and softmax's statistics stay
#: fp32); in fp32 not twice that: attention saves no score table with the fused kernels.
#: Measured on SmolLM2-135M (packed rows, 128-4,096 tokens, probe peaks): a full fine-tune
#: 84 (fp32) and 62 (bf16) bytes, LoRA 69 and 50; these round up, to err on the safe side.
ACT_BYTES = {"fp32": 96, "half": 68}
CKPT_FACTOR = 2  # with checkpointing only each layer's input survives (in element sizes)
#: what a step holds beyond weights, gradients, optimizer state, activations and the logits
#: chunk: the loss's weight-gradient block (train/cross_entropy.py), oneDNN's and the
#: allocator's scratch. SmolLM2-135M's measured fixed part was 0.4-0.6 GB, the 0.1 GB chunk
#: included
WORKSPACE_GB = 0.4


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
    activations_gb: float  # with the loss's chunk of logits
    scratch_gb: float
    total_gb: float

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in asdict(self).items()}


def estimate(
    shape: ModelShape, micro_batch: int, max_length: int, precision: str, checkpointing: bool
) -> MemoryEstimate:
    act_bytes = 4 if precision == "fp32" else 2
    weights = shape.total_params * 4  # fp32 master weights
    if precision != "fp32":
        # half-precision copies of the Linear weights (all but the embedding table): LoRA's
        # frozen base is cast once for the run (train/frozen.py), a full fine-tune's weights
        # are cast by autocast and held for backward; LoRA bf16 at micro-batch 1 measured
        # 1.2 GB of training state against 0.8 GB predicted without them
        weights += (shape.total_params - shape.vocab_size * shape.hidden_size) * 2
    grads = shape.trainable_params * 4
    adam = shape.trainable_params * 8  # exp_avg + exp_avg_sq
    tokens = micro_batch * max_length
    per_unit = ACT_BYTES["fp32" if precision == "fp32" else "half"]
    if checkpointing:  # each layer's input kept; one layer recomputed at a time in full
        per_unit = CKPT_FACTOR * act_bytes * shape.num_layers + per_unit
    else:
        per_unit *= shape.num_layers
    acts = tokens * shape.hidden_size * per_unit
    # the logits exist one chunk of positions at a time, in fp32 with their gradient
    logits = min(tokens, CHUNK) * shape.vocab_size * 4 * 2
    parts = [weights / GB, grads / GB, adam / GB, (acts + logits) / GB, WORKSPACE_GB]
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
