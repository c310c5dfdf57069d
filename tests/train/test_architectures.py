"""The forward rewrites tunepilot applies at load time (hand-written RMSNorm, shared
projections, LoRA sums in the matmul) leave other architectures' losses and gradients as they
were: biases on q/k/v (Qwen2), per-head norms (Qwen3), a norm that computes something else
(Gemma's 1 + weight), projections a model already fuses (Phi-3), Conv1D layers (GPT-2)."""

from __future__ import annotations

import pytest
import torch
import transformers

from tests.conftest import loss_and_grads, max_rel, with_live_lora
from tunepilot.train.adapters import fuse_adapter_sums
from tunepilot.train.projections import share_inputs, shared
from tunepilot.train.rms_norm import use_fast_norms

SIZES = {
    "vocab_size": 512,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
# name: (config, extra config, RMSNorms switched, (layers sharing matmuls, groups)) without LoRA
ARCHITECTURES = {
    "qwen2": (transformers.Qwen2Config, {}, 5, (10, 4)),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 8}, 9, (10, 4)),
    "gemma": (transformers.GemmaConfig, {"head_dim": 8}, 0, (10, 4)),
    "phi3": (transformers.Phi3Config, {"pad_token_id": 0}, 5, (0, 0)),
    "gpt2": (transformers.GPT2Config, None, 0, (0, 0)),
}


def _model(name: str) -> torch.nn.Module:
    config_class, extra, _, _ = ARCHITECTURES[name]
    torch.manual_seed(0)
    if extra is None:  # GPT-2 names its sizes its own way; no dropout, so runs compare
        config = config_class(
            vocab_size=512, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0, embd_pdrop=0,
            attn_pdrop=0,
        )  # fmt: skip
    else:
        config = config_class(**SIZES, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms away from 1 and biases away from 0, or they prove nothing
        for parameter_name, p in model.named_parameters():
            if "norm" in parameter_name or ".ln_" in parameter_name:
                p.uniform_(0.5, 1.5)
            elif parameter_name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_rewrites_keep_losses_and_gradients(name, lora):
    model = _model(name)
    if lora:
        model = with_live_lora(model, std=0.1)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    before = loss_and_grads(model, ids)
    norms = use_fast_norms(model)
    sums = fuse_adapter_sums(model)
    share_inputs(model, torch.arange(4).unsqueeze(0))
    _, _, want_norms, want_shared = ARCHITECTURES[name]
    assert norms == want_norms
    assert (sums > 0) == lora
    if not lora:
        assert shared(model) == want_shared
    after = loss_and_grads(model, ids)
    assert max_rel(after[0], before[0]) < 1e-6
    assert before[1].keys() == after[1].keys()
    for parameter_name, grad in before[1].items():
        assert max_rel(after[1][parameter_name], grad) < 1e-4, parameter_name
