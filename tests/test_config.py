"""Config validation: every problem at once, each naming file, line and field."""

from pathlib import Path

import pytest

from tunepilot.config import AUTO, load_config
from tunepilot.errors import UserError


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n')
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def problems(path: Path, *overrides: str) -> list[str]:
    with pytest.raises(UserError) as info:
        load_config(path, list(overrides))
    return info.value.problems


def test_bundled_recipe_loads_with_overrides():
    cfg = load_config(None, ["train.max_steps=5", "train.learning_rate=1e-3"])
    assert cfg.train.max_steps == 5
    assert cfg.train.learning_rate == pytest.approx(1e-3)
    assert cfg.train.micro_batch_size == AUTO
    assert Path(cfg.data.train).is_file()


def test_unknown_key_gets_did_you_mean_with_line(tmp_path):
    path = write(tmp_path, "data:\n  train: train.jsonl\ntrain:\n  learnin_rate: 0.1\n")
    (msg,) = problems(path)
    assert "config.yaml:4" in msg and "train.learnin_rate" in msg
    assert "did you mean 'learning_rate'" in msg


def test_other_trainers_names_point_at_ours(tmp_path):
    path = write(tmp_path, "data: {train: train.jsonl}\ntrain:\n  num_train_epochs: 2\n")
    in_file, on_command_line, lora = problems(path, "train.lr=1e-4", "lora.lora_r=8")
    assert in_file.endswith(
        "config.yaml:3: train.num_train_epochs: unknown key; here it is called 'num_epochs'"
    )
    assert on_command_line == "--set train.lr: unknown key; here it is called 'learning_rate'"
    assert lora == "--set lora.lora_r: unknown key; here it is called 'r'"


def test_all_problems_reported_at_once(tmp_path):
    path = write(
        tmp_path,
        "\n".join(
            [
                "data:",
                "  train: train.jsonl",
                "train:",
                "  learning_rate: -1",
                "  warmup_ratio: 1.5",
                "  global_batch_size: 16",
                "  micro_batch_size: 4",
                "  gradient_accumulation_steps: 3",
                "method: qlora",
            ]
        )
        + "\n",
    )
    found = problems(path)
    joined = "\n".join(found)
    assert len(found) == 4, joined
    assert "config.yaml:4: train.learning_rate: must be > 0" in joined
    assert "config.yaml:5: train.warmup_ratio: must be < 1" in joined
    assert "16 != micro_batch_size 4 x gradient_accumulation_steps 3" in joined
    assert "config.yaml:9: method: must be one of lora, full" in joined


def test_both_warmup_forms_rejected(tmp_path):
    path = write(
        tmp_path, "data: {train: train.jsonl}\ntrain: {warmup_steps: 10, warmup_ratio: 0.1}\n"
    )
    (msg,) = problems(path)
    assert "either warmup_steps or warmup_ratio" in msg


def test_global_not_multiple_of_micro(tmp_path):
    path = write(
        tmp_path,
        "data: {train: train.jsonl}\ntrain: {global_batch_size: 10, micro_batch_size: 4}\n",
    )
    (msg,) = problems(path)
    assert "not a multiple of micro_batch_size 4" in msg


def test_missing_model_path_and_data(tmp_path):
    path = write(tmp_path, "model: ./no/such/model\ndata: {train: missing.jsonl}\n")
    found = "\n".join(problems(path))
    assert "model: " in found and "no such model" in found
    assert "missing.jsonl: no such file" in found


def test_data_train_required(tmp_path):
    path = write(tmp_path, "method: lora\n")
    (msg,) = problems(path)
    assert "data.train: required" in msg


def test_set_override_is_validated(tmp_path):
    path = write(tmp_path, "data: {train: train.jsonl}\n")
    (msg,) = problems(path, "train.max_steps=abc")
    assert "train.max_steps: must be a whole number or auto" in msg


def test_a_value_set_on_the_command_line_is_blamed_there_not_on_the_files_line(tmp_path):
    path = write(tmp_path, "data:\n  train: train.jsonl\ntrain:\n  learning_rate: 0.1\n")
    (msg,) = problems(path, "train.learning_rate=-1")
    assert msg.startswith("--set train.learning_rate: must be > 0") and "config.yaml" not in msg
    (msg,) = problems(path, "data.train=missing.jsonl")
    assert msg.startswith("--set data.train: missing.jsonl: no such file")
    (msg,) = problems(path, "train.max_steps=0")  # not in the file at all
    assert msg.startswith("--set train.max_steps: 0 trains nothing")


def test_relative_data_paths_follow_the_config_file(tmp_path, monkeypatch):
    path = write(tmp_path, "data: {train: train.jsonl}\n")
    monkeypatch.chdir("/")
    cfg = load_config(path)
    assert Path(cfg.data.train) == tmp_path / "train.jsonl"


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "data:\n  train: [unclosed\n")
    (msg,) = problems(path)
    assert "config.yaml:" in msg and "invalid YAML" in msg


def test_missing_config_file(tmp_path):
    (msg,) = problems(tmp_path / "nope.yaml")
    assert "nope.yaml: no such config file" in msg


def test_the_bundled_model_answers_to_its_own_spelling(tmp_path, monkeypatch):
    """Users copy the name from the model card; only a local path of that name comes first."""
    from tunepilot.model import resolve

    assert resolve("SmolLM2-135M-Instruct") == resolve("smollm2-135m-instruct")
    # and the config accepts that spelling too (it refused it as a missing path before)
    config = write(tmp_path, "model: SmolLM2-135M-Instruct\ndata: {train: train.jsonl}\n")
    assert load_config(config, []).model == "SmolLM2-135M-Instruct"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "SmolLM2-135M-Instruct").mkdir()
    (tmp_path / "SmolLM2-135M-Instruct" / "config.json").write_text("{}")
    assert resolve("SmolLM2-135M-Instruct").kind == "dir"


def test_a_data_file_or_directory_where_the_config_goes_is_told_so(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello"}\n')
    (msg,) = problems(data)
    assert "a data file, not a config" in msg and f"--set data.train={data}" in msg
    listed = tmp_path / "rows.json"
    listed.write_text('[{"text": "hello"}]')
    (msg,) = problems(listed)
    assert "a JSON list (data), not a config" in msg
    (msg,) = problems(tmp_path)
    assert "a directory, not a config file" in msg and "--set model=" in msg


def test_own_data_on_the_bundled_recipe_is_not_scored_on_the_recipes_eval_set(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"text": "hello"}\n')
    cfg = load_config(None, [f"data.train={data}"])
    assert cfg.data.eval is None  # a seeded split of the user's own data
    both = load_config(None, [f"data.train={data}", f"data.eval={data}"])
    assert both.data.eval == str(data)
    assert load_config(None).data.eval  # the recipe alone keeps its eval set
    own = write(tmp_path, "data: {train: train.jsonl, eval: train.jsonl}\n")
    kept = load_config(own, [f"data.train={data}"])
    assert Path(kept.data.eval) == tmp_path / "train.jsonl"  # a user's config keeps its own


def test_a_hub_dataset_id_as_data_says_how_to_get_it_here(tmp_path):
    (msg,) = problems(write(tmp_path, "data: {train: tatsu-lab/alpaca}\n"))
    assert "tatsu-lab/alpaca: no such file or directory; a Hugging Face Hub dataset" in msg
    (msg,) = problems(write(tmp_path, "data: {train: data/missing.jsonl}\n"))
    assert msg.endswith("missing.jsonl: no such file or directory")
