"""Write a Llama-family Hugging Face model as an f16 GGUF file (llama.cpp, Ollama, LM Studio).

What llama.cpp's own converter (``convert_hf_to_gguf.py``) does for ``LlamaForCausalLM``, kept
to the part this project needs:

- tensor names from gguf's own HF -> GGUF name map (``model.layers.0.self_attn.q_proj.weight``
  -> ``blk.0.attn_q.weight``); the tied ``lm_head`` is omitted, which tells readers to tie it;
- Q and K projections permuted: HF stores each head's rotary dimensions as two halves, llama.cpp
  interleaves them in pairs; readers (transformers included) undo this on load;
- matrices in f16, 1-D tensors (norm weights) in f32;
- the byte-level BPE tokenizer as metadata: tokens, token types, merges, special ids, BOS/EOS
  behaviour and the chat template, so the file alone is enough to run the model.

Anything else (other architectures, rope scaling, sentencepiece vocabularies) is refused with a
clear message rather than written wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tunepilot.errors import UserError

#: tokenizers.json pre-tokenizer regex -> llama.cpp ``tokenizer.ggml.pre`` name, for the
#: common ones transformers also knows how to rebuild; plain GPT-2 byte-level is "gpt2"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
KNOWN_SPLITS = {_LLAMA3_SPLIT: "llama-bpe"}


def check_supported(model: nn.Module, tokenizer: Any) -> None:
    """UserError (exit 2) naming what is not supported, before anything is written."""
    config = model.config
    problems = []
    if config.model_type != "llama":
        problems.append(
            f"gguf export supports llama-family models; this one is {config.model_type!r}: "
            "use --format hf (llama.cpp's convert_hf_to_gguf.py converts that)"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") not in ("default", None):
        problems.append(f"gguf export: rope scaling {rope.get('rope_type')!r} is not supported yet")
    if pre_tokenizer_name(tokenizer) is None:
        problems.append(
            "gguf export supports byte-level BPE tokenizers (GPT-2 style); this tokenizer is "
            "not one: use --format hf"
        )
    if problems:
        raise UserError(*problems)


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else {}


def pre_tokenizer_name(tokenizer: Any) -> str | None:
    """llama.cpp's name for how this tokenizer splits text before BPE; None if unsupported."""
    spec = _tokenizer_json(tokenizer)
    if (spec.get("model") or {}).get("type") != "BPE":
        return None
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"
    parts = pre.get("pretokenizers") or []
    if pre.get("type") == "Sequence" and len(parts) == 2:
        split, byte_level = parts
        pattern = (split.get("pattern") or {}).get("Regex")
        if split.get("type") == "Split" and byte_level.get("type") == "ByteLevel":
            return KNOWN_SPLITS.get(pattern)
    return None


def tokenizer_metadata(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """Everything a GGUF reader needs to rebuild the tokenizer."""
    spec = _tokenizer_json(tokenizer)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {i: t.special for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(3 if added.get(i) else 4 if i in added else 1)  # CONTROL/USER/NORMAL
        else:  # embedding rows the tokenizer never produces (vocab padded for speed)
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    probe = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    with_special, plain = (list(p) for p in probe)
    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "pre": pre_tokenizer_name(tokenizer),
        "add_bos": len(with_special) > len(plain) and with_special[0] == tokenizer.bos_token_id,
        "add_eos": len(with_special) > len(plain) and with_special[-1] == tokenizer.eos_token_id,
    }


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotary layout -> llama.cpp's (the inverse of transformers' reverse_permute)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def gguf_tensors(model: nn.Module) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, array) for every weight, permuted and cast as llama.cpp expects."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out, unknown = [], []
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            unknown.append(hf_name)
            continue
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if name.endswith("attn_q.weight"):
            data = permute_qk(data, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            data = permute_qk(data, config.num_key_value_heads)
        out.append((name, data.astype(np.float16 if data.ndim > 1 else np.float32)))
    if unknown:
        raise UserError(f"gguf export: no GGUF name for tensors {', '.join(unknown[:5])}")
    return out


def write_gguf(model: nn.Module, tokenizer: Any, path: Path, name: str) -> None:
    """Write ``model`` and ``tokenizer`` to ``path`` as an f16 GGUF (llama architecture)."""
    import gguf

    check_supported(model, tokenizer)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    vocab = model.get_input_embeddings().weight.shape[0]
    tok = tokenizer_metadata(tokenizer, vocab)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_vocab_size(vocab)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(theta))
    writer.add_rope_dimension_count(head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    for token_id, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(tok["add_bos"])
    writer.add_add_eos_token(tok["add_eos"])
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    for tensor_name, data in gguf_tensors(model):
        writer.add_tensor(tensor_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
