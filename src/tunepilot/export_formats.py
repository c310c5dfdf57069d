"""``tunepilot export RUN_DIR --format hf|adapter|gguf``: write a run's model for other tools,
then load it back the way those tools would and compare logits with the run's own model.

- hf: the merged model re-saved as safetensors with its tokenizer and chat template;
  reloaded with ``AutoModelForCausalLM.from_pretrained``; should be bit-identical.
- adapter: the PEFT LoRA adapter (plus tokenizer files); reloaded with
  ``PeftModel.from_pretrained`` on the base model; differs from the merged model only by
  floating-point summation order.
- gguf: an f16 GGUF (``gguf_export``); reloaded with ``from_pretrained(gguf_file=...)``. It is
  compared twice: with the run's model rounded to f16 the same way (must match: catches layout
  bugs), and with the fp32 model itself (the cost of f16, reported against a looser bound).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from tunepilot import model as models
from tunepilot.errors import UserError
from tunepilot.inference import logits_for
from tunepilot.rundir import read_run
from tunepilot.verify import Check, compare, compare_tokenizers, prompt_ids, rounded_to_f16

FORMATS = ("hf", "adapter", "gguf")
#: fp32 logits of the same weights through the same code: only summation order may differ
EXACT_TOLERANCE = 1e-4
#: merged (W + BA) vs unmerged (Wx + BAx) LoRA in fp32: summation order on ~20-sized logits
ADAPTER_TOLERANCE = 2e-3
#: f16 storage vs fp32: relative to the largest reference logit, with a floor
F16_RELATIVE_TOLERANCE = 0.02


@dataclass
class ExportResult:
    format: str
    path: Path
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def export_run(run_dir: Path, fmt: str, out: Path | None = None) -> ExportResult:
    """Export and verify; UserError for impossible requests, RunError when verification fails."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    run = read_run(Path(run_dir))
    merged = run.path / "model"
    if not (merged / "config.json").is_file():
        raise UserError(f"{run.path}: no model/ (the run did not finish); train it to the end")
    if fmt == "adapter" and not (run.path / "adapter" / "adapter_config.json").is_file():
        method = (run.plan.get("model") or {}).get("method", "?")
        raise UserError(
            f"{run.path}: no adapter/: this run was a {method} fine-tune "
            f"(method: {method}), so there is no adapter to export; use --format hf"
        )
    target, existed = _prepare_out(out, run.path / "export" / fmt)
    exporter = {"hf": _export_hf, "adapter": _export_adapter, "gguf": _export_gguf}[fmt]
    try:
        return exporter(run.path, run.plan, target)
    except BaseException:
        # Ctrl-C, SIGTERM or an error mid-write: a half-written model must not pass for an
        # export, nor block the next try at the same --out (which must be new or empty)
        shutil.rmtree(target, ignore_errors=True)
        if existed:
            target.mkdir()  # the user's empty folder, as it was
        raise


def _prepare_out(out: Path | None, default: Path) -> tuple[Path, bool]:
    """The folder to export into, and whether it existed before (empty) as the user's.

    The default folder is ours to overwrite; a user's --out must be new or empty.
    """
    if out is None:
        shutil.rmtree(default, ignore_errors=True)
        default.mkdir(parents=True)
        return default, False
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty folder; pass a new folder")
    existed = out.is_dir()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create ({exc.strerror})") from None
    return out, existed


def _load(path: Path, **kwargs: Any) -> Any:
    from transformers import AutoModelForCausalLM

    # the GGUF loader draws a tqdm bar that transformers' progress-bar switch does not reach
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    return model.eval()


def _tokenizer(path: Path, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, **kwargs)


def _export_hf(run_dir: Path, plan: dict[str, Any], out: Path) -> ExportResult:
    source, tokenizer = _load(run_dir / "model"), _tokenizer(run_dir / "model")
    source.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    reloaded, reloaded_tok = _load(out), _tokenizer(out)
    compare_tokenizers("hf export", tokenizer, reloaded_tok)
    ids = prompt_ids(tokenizer)
    check = compare("hf export vs run model", source, reloaded, ids, EXACT_TOLERANCE)
    return ExportResult("hf", out, [check])


def _export_adapter(run_dir: Path, plan: dict[str, Any], out: Path) -> ExportResult:
    from peft import PeftModel

    for item in (run_dir / "adapter").iterdir():
        if item.is_file():
            shutil.copy2(item, out / item.name)
    tokenizer = _tokenizer(run_dir / "model")
    tokenizer.save_pretrained(out)  # PEFT loaders look for the tokenizer beside the adapter
    base_dir = _base_model_dir(plan, out)
    base = _load(base_dir)
    vocab = base.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:  # training added a pad token: same rows, as the run did
        base.resize_token_embeddings(len(tokenizer))
    adapted = PeftModel.from_pretrained(base, out).eval()
    merged = _load(run_dir / "model")
    ids = prompt_ids(tokenizer)
    check = compare(
        "adapter on base vs run model", merged, adapted, ids, ADAPTER_TOLERANCE, vocab=vocab
    )
    note = f"base model: {base_dir} (adapter_config.json base_model_name_or_path)"
    return ExportResult("adapter", out, [check], [note])


def _base_model_dir(plan: dict[str, Any], out: Path) -> Path:
    """The base the adapter was trained on: adapter_config's path, else the plan's model."""
    config = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    recorded = config.get("base_model_name_or_path")
    if recorded and (Path(recorded) / "config.json").is_file():
        return Path(recorded)
    model_info = plan.get("model") or {}
    name = model_info.get("path") or model_info.get("name")
    if not name:
        raise UserError(f"{out}: cannot tell which base model the adapter belongs to")
    return Path(models.local_dir(models.resolve(str(name))))


def _export_gguf(run_dir: Path, plan: dict[str, Any], out: Path) -> ExportResult:
    from tunepilot.gguf_export import check_supported, write_gguf

    source, tokenizer = _load(run_dir / "model"), _tokenizer(run_dir / "model")
    check_supported(source, tokenizer)
    path = out / f"{run_dir.name}-f16.gguf"
    write_gguf(source, tokenizer, path, str((plan.get("model") or {}).get("name", run_dir.name)))
    reloaded = _load(out, gguf_file=path.name)
    compare_tokenizers("gguf export", tokenizer, _tokenizer(out, gguf_file=path.name))
    ids = prompt_ids(tokenizer)
    exported = logits_for(reloaded, ids)
    layout = compare(
        "gguf vs run model rounded to f16", rounded_to_f16(source), exported, ids, EXACT_TOLERANCE
    )
    storage = compare("gguf vs run model (fp32)", source, exported, ids, math.inf)
    loose = round(max(0.05, F16_RELATIVE_TOLERANCE * storage.reference_max), 3)
    return ExportResult("gguf", path, [layout, replace(storage, tolerance=loose)])
