"""Write what a run produced in formats that load without tunepilot.

``adapter/`` is a standard PEFT adapter; ``model/`` is a merged Hugging Face model (safetensors)
with its tokenizer, chat template and pad token, loadable by plain
``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def save_adapter(model: nn.Module, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)


def save_merged(
    model: nn.Module, tokenizer: Any, out: Path, weights: dict[str, torch.Tensor] | None = None
) -> None:
    """Merge LoRA weights into the base (in place: call last) and save a plain HF model.

    ``weights``: the whole state dict when ``model`` itself holds only a shard of it (FSDP2).
    """
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    disable = getattr(merged, "activation_checkpointing_disable", None)
    (disable or merged.gradient_checkpointing_disable)()  # a no-op when it was off
    # training turned the cache off; generation with the saved model wants it back on
    merged.config.use_cache = True
    merged.config.pad_token_id = tokenizer.pad_token_id
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(out, safe_serialization=True, state_dict=weights)
    tokenizer.padding_side = "left"  # what generation wants; training sets right explicitly
    tokenizer.save_pretrained(out)
