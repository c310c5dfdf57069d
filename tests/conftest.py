"""Shared fixtures: the real tokenizer (extracted once per run) and tiny Llama models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tunepilot import model as models
from tunepilot.data.formats import Example
from tunepilot.data.tokenize import Tokenized, tokenize_example

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# a bug inside the CLI raises in the test instead of becoming a one-line "internal error"
os.environ.setdefault("TUNEPILOT_TRACEBACK", "1")


@pytest.fixture(scope="session")
def bundled_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model converted to safetensors, in a cache private to this test run."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["TUNEPILOT_CACHE"] = str(cache)
    return Path(models.local_dir(models.resolve("smollm2-135m-instruct")))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """The bundled model's tokenizer. TUNEPILOT_TEST_TOKENIZER names a saved copy instead, for
    machines without the bundled package (the 98 MB model file does not travel to a lent GPU);
    the tests marked slow still need the real model there."""
    given = os.environ.get("TUNEPILOT_TEST_TOKENIZER")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(request.getfixturevalue("bundled_dir")).save_pretrained(out)
    return out


@pytest.fixture
def tokenizer(tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def tiny_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def tiny_model(vocab_size: int = 49152, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(vocab_size))
    model.config.use_cache = False
    return model


def with_live_lora(model: torch.nn.Module, std: float, dropout: float = 0.0) -> torch.nn.Module:
    """``model`` frozen, with rank-4 LoRA on every linear layer and B drawn from N(0, std):
    LoRA's B starts at zero, which would make the adapters change nothing."""
    for p in model.parameters():
        p.requires_grad_(False)
    model = models.add_lora(model, 4, 8, dropout, "all-linear")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    return model


def loss_and_grads(
    model: torch.nn.Module, ids: torch.Tensor, precision: str = "fp32"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One language-model loss on ``ids`` (as labels too) and every gradient it produced."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``b``."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with random weights and the real tokenizer, saved like any HF model."""
    out = tmp_path_factory.mktemp("tiny-llama")
    tiny_model().save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_run_config(
    folder: Path,
    model: Path,
    train: dict,
    n_train: int = 40,
    n_eval: int = 6,
    eval_seed: int = 9,
) -> Path:
    """train.jsonl, eval.jsonl and a config.yaml in ``folder`` that trains ``model`` on them
    with the given ``train`` settings (data paths relative to the config, as users write them)."""
    write_jsonl(folder / "train.jsonl", chat_rows(n_train))
    write_jsonl(folder / "eval.jsonl", chat_rows(n_eval, seed=eval_seed))
    path = folder / "config.yaml"
    config = {
        "model": str(model),
        "data": {"train": "train.jsonl", "eval": "eval.jsonl"},
        "train": train,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """Variable-length chat examples (lengths differ so padding and masking matter)."""
    import random

    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "echo", "fox", "golf", "hotel", "india"]
    rows = []
    for i in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        a = " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
        msgs = [{"role": "user", "content": f"{i}: {q}"}, {"role": "assistant", "content": a}]
        if i % 3 == 0:
            msgs.insert(0, {"role": "system", "content": "Be brief."})
        rows.append({"messages": msgs})
    return rows


def tokenized_chat(tokenizer, n: int, seed: int = 0) -> list[Tokenized]:
    """``chat_rows(n, seed)`` through the real tokenizer's chat template."""
    return [
        tokenize_example(Example(tuple(r["messages"]), None, f"x:{i}"), tokenizer)
        for i, r in enumerate(chat_rows(n, seed))
    ]
