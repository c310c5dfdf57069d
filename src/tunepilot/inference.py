"""Load a trained (or any) model for inference: ``eval``, ``chat`` and ``export`` start here.

A target is a run directory (its ``model/`` is used) or anything ``model:`` accepts in a config:
a bundled alias, a Hugging Face model directory, a ``.gguf`` file or a cached hub id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunepilot import hardware
from tunepilot import model as models
from tunepilot.errors import UserError
from tunepilot.rundir import is_run_dir


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: Any
    name: str  # what the user passed
    device: str
    precision: str  # autocast precision: "fp32" | "bf16"


def resolve_target(target: str) -> models.ModelSource:
    """A run directory means its merged model; anything else goes through ``model.resolve``."""
    path = Path(target).expanduser()
    if path.is_dir() and is_run_dir(path):
        merged = path / "model"
        if not (merged / "config.json").is_file():
            raise UserError(
                f"{target}: run directory has no model/ (the run did not finish); "
                "train it to the end, or pass a model directory"
            )
        return models.ModelSource(target, merged.resolve(), "dir")
    if models.missing_path(target):
        raise UserError(
            f"{target}: no such run directory, model directory or .gguf file; pass a train "
            f"run's --output-dir, a model directory, a .gguf file, a hub id or one of: "
            f"{', '.join(models.BUNDLED_MODELS)}"
        )
    return models.resolve(target)


def inference_precision(bf16: bool) -> str:
    """bf16 autocast where the hardware computes it natively (as in training), else fp32.

    The weights stay fp32 either way, so losses are comparable with the run's own evaluation.
    """
    return "bf16" if bf16 else "fp32"


def load_tokenizer(target: str) -> Any:
    """The target's tokenizer, with a pad token for batched, left-padded generation."""
    from tunepilot.data.tokenize import ensure_chat_template

    tokenizer = models.load_tokenizer(resolve_target(target))
    ensure_chat_template(tokenizer)  # base models: the same fallback training used
    if tokenizer.pad_token is None:
        # pads are masked out by attention and never scored, so any id is safe here
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise UserError(f"{target}: tokenizer has no pad, eos or unk token to pad batches with")
    tokenizer.padding_side = "left"
    return tokenizer


def load_for_inference(target: str, tokenizer: Any | None = None) -> Loaded:
    """Model (fp32 weights, eval mode, KV cache on) and tokenizer on the best device."""
    source = resolve_target(target)
    tokenizer = tokenizer or load_tokenizer(target)
    hw = hardware.detect()
    model = models.load_model(source)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise UserError(
            f"{target}: the tokenizer has {len(tokenizer)} tokens but the model only {rows} "
            "embeddings; they do not belong together"
        )
    model.config.use_cache = True  # load_model turns it off for training
    model.eval()
    model.to(hw.device)
    return Loaded(model, tokenizer, target, hw.device, inference_precision(hw.bf16))


def context_length(model: nn.Module) -> int:
    config = getattr(model.config, "text_config", None) or model.config
    return int(getattr(config, "max_position_embeddings", 2048) or 2048)


@torch.no_grad()
def logits_for(model: nn.Module, input_ids: list[list[int]]) -> list[torch.Tensor]:
    """Full-vocabulary fp32 logits for each prompt (one at a time: no padding to compare)."""
    device = next(model.parameters()).device
    out = []
    for ids in input_ids:
        x = torch.tensor([ids], device=device)
        out.append(model(input_ids=x, use_cache=False).logits[0].float().cpu())
    return out
