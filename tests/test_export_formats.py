"""``tunepilot export``: each format is reloaded the way its users load it and compared."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_model
from tests.fake_run import make_run
from tunepilot import gguf_export
from tunepilot.cli import main
from tunepilot.verify import PROMPTS


@pytest.fixture(scope="module")
def small_vocab_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a 320-token byte-level BPE vocabulary. GGUF readers parse the
    vocabulary one string at a time (~4 s per read for 49k tokens); 320 keep the test fast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([*PROMPTS, "hello world, the quick brown fox"] * 3, trainer)
    small = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=special[1], eos_token=special[2], unk_token=special[0]
    )
    small.pad_token = special[0]
    # the real model's ChatML template
    small.chat_template = AutoTokenizer.from_pretrained(tokenizer_dir).chat_template
    out = tmp_path_factory.mktemp("small-vocab")
    tiny_model(vocab_size=len(small)).save_pretrained(out)
    small.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def runs(
    tiny_model_dir: Path, small_vocab_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    root = tmp_path_factory.mktemp("runs")
    make_run(root / "lora", tiny_model_dir, method="lora")
    make_run(root / "full", small_vocab_dir, method="full")
    return root


def diffs(out: str) -> list[tuple[float, float]]:
    """(max abs diff, tolerance) of every verification line."""
    found = re.findall(r"max \|logit diff\| (\S+) over .* tolerance (\S+): ok", out)
    return [(float(d), float(t)) for d, t in found]


def test_export_hf_is_identical(runs: Path, tmp_path: Path, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(runs / "lora"), "--format", "hf", "--out", str(out)]) == 0
    checks = diffs(capsys.readouterr().out)
    assert checks == [(0.0, 1e-4)]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}


def test_export_adapter_matches_the_merged_model(runs: Path, capsys):
    assert main(["export", str(runs / "lora"), "--format", "adapter"]) == 0
    out = capsys.readouterr().out
    [(diff, tolerance)] = diffs(out)
    assert diff <= tolerance
    exported = runs / "lora" / "export" / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in exported.iterdir()
    }


def test_export_adapter_of_a_full_fine_tune_is_refused(runs: Path, capsys):
    assert main(["export", str(runs / "full"), "--format", "adapter"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "full fine-tune" in err and "--format hf" in err


def test_export_gguf_round_trips(runs: Path, tmp_path: Path, capsys):
    out = tmp_path / "gguf"
    assert main(["export", str(runs / "full"), "--format", "gguf", "--out", str(out)]) == 0
    layout, storage = diffs(capsys.readouterr().out)
    assert layout[0] <= 1e-4  # same f16 weights through the same code
    assert 0 < storage[0] <= storage[1]  # f16 rounding shows, within bounds
    assert (out / "full-f16.gguf").stat().st_size > 0


def test_a_broken_gguf_layout_fails_verification(runs: Path, tmp_path: Path, monkeypatch, capsys):
    # without llama.cpp's Q/K permutation the file loads fine and computes nonsense
    monkeypatch.setattr(gguf_export, "permute_qk", lambda weight, n_head: np.asarray(weight))
    out = tmp_path / "bad"
    assert main(["export", str(runs / "full"), "--format", "gguf", "--out", str(out)]) == 3
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "export verification failed" in captured.err
    assert f"left in {out / 'full-f16.gguf'} for inspection, not for use" in captured.err


def test_export_refuses_a_non_empty_out(runs: Path, tmp_path: Path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["export", str(runs / "lora"), "--format", "hf", "--out", str(tmp_path)]) == 2
    assert "not an empty folder" in capsys.readouterr().err


@pytest.mark.parametrize("made_by_user", [False, True])
def test_an_interrupted_export_leaves_nothing_half_written(
    runs: Path, tmp_path: Path, monkeypatch, capsys, made_by_user: bool
):
    """Ctrl-C while the model is being written: no partial file may pass for an export, and the
    same command must work when run again (a user's --out has to be new or empty)."""
    from transformers import PreTrainedModel

    out = tmp_path / "hf"
    if made_by_user:
        out.mkdir()
    real_save = PreTrainedModel.save_pretrained

    def interrupted(self, path, *args, **kwargs):
        (Path(path) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", interrupted)
    assert main(["export", str(runs / "lora"), "--format", "hf", "--out", str(out)]) == 130
    assert capsys.readouterr().err == "error: interrupted\n"
    assert (list(out.iterdir()) == []) if made_by_user else not out.exists()

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real_save)
    assert main(["export", str(runs / "lora"), "--format", "hf", "--out", str(out)]) == 0
    assert (out / "model.safetensors").stat().st_size > 4
