"""The one config schema: typed dataclasses, YAML + ``--set a.b=c`` overrides, validation.

Every field may be ``auto`` where that makes sense; ``auto`` is resolved by the planner
(``tunepilot.plan``), never here. Validation collects *every* problem before raising, so a user
fixes a config in one round trip, and names the file, line and field of each problem.
"""

from __future__ import annotations

import difflib
import importlib.resources
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from tunepilot.errors import UserError

AUTO = "auto"
METHODS = ("lora", "full")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "warmup_stable_decay")
OPTIMIZERS = ("adamw",)
PRECISIONS = ("fp32", "bf16", "fp16")
DATA_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text")


def _knob(
    default: Any,
    kind: type,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    choices: tuple[str, ...] = (),
    auto: bool = True,
    nullable: bool = False,
    words: tuple[str, ...] = (),
) -> Any:
    """A config field whose metadata drives validation and ``--help``-style docs."""
    meta = {
        "kind": kind,
        "help": help,
        "low": low,
        "high": high,
        "low_open": low_open,
        "high_open": high_open,
        "choices": choices,
        "auto": auto,
        "nullable": nullable,
        "words": words,  # special string values besides auto, e.g. learning_rate: find
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class LoraSettings:
    r: int = _knob(16, int, "LoRA rank", low=1, auto=False)
    alpha: float = _knob(
        32, float, "LoRA scaling numerator (scale = alpha / r)", low=0, low_open=True, auto=False
    )
    # 0 by default: on CPU, dropout on the inputs of every adapted layer measured ~1/3 of step
    # time (286 vs 432 tokens/s on the demo), for little benefit in short fine-tunes
    dropout: float = _knob(
        0.0, float, "dropout on the LoRA input", low=0, high=1, high_open=True, auto=False
    )
    target_modules: Any = _knob(
        "all-linear", list, "module names to adapt, or 'all-linear'", auto=False
    )


@dataclass
class DataSettings:
    train: str | None = _knob(
        None, str, "training data file or datasets dir", auto=False, nullable=True
    )
    eval: str | None = _knob(
        None, str, "held-out data; omitted: a seeded split of train", auto=False, nullable=True
    )
    format: str = _knob("auto", str, "data format", choices=DATA_FORMATS, auto=False)
    eval_fraction: float = _knob(
        0.1,
        float,
        "share of train held out when data.eval is unset",
        low=0,
        high=0.5,
        low_open=True,
        auto=False,
    )
    eval_max_examples: int = _knob(
        200, int, "cap on eval rows used for loss and exact match", low=1, auto=False
    )


@dataclass
class TrainSettings:
    micro_batch_size: Any = _knob(AUTO, int, "examples per forward/backward pass", low=1)
    global_batch_size: Any = _knob(AUTO, int, "examples per optimizer step", low=1)
    gradient_accumulation_steps: Any = _knob(AUTO, int, "micro-batches per optimizer step", low=1)
    max_length: Any = _knob(AUTO, int, "tokens per example; longer ones are truncated", low=8)
    num_epochs: Any = _knob(AUTO, float, "passes over the training data", low=0, low_open=True)
    max_steps: Any = _knob(AUTO, int, "optimizer steps; > 0 overrides num_epochs", low=-1)
    learning_rate: Any = _knob(
        AUTO,
        float,
        "peak learning rate, or 'find' (range test + held-out mini-sweep)",
        low=0,
        low_open=True,
        words=("find",),
    )
    scheduler: Any = _knob(AUTO, str, "learning-rate schedule", choices=SCHEDULERS)
    warmup_steps: Any = _knob(AUTO, int, "warmup in optimizer steps", low=0)
    warmup_ratio: Any = _knob(
        AUTO, float, "warmup as a share of total steps", low=0, high=1, high_open=True
    )
    weight_decay: Any = _knob(AUTO, float, "AdamW decoupled weight decay", low=0)
    optimizer: Any = _knob(AUTO, str, "optimizer", choices=OPTIMIZERS)
    max_grad_norm: Any = _knob(AUTO, float, "gradient clipping threshold (0 = off)", low=0)
    precision: Any = _knob(AUTO, str, "numeric precision of compute", choices=PRECISIONS)
    gradient_checkpointing: Any = _knob(AUTO, bool, "recompute activations to save memory")
    packing: Any = _knob(
        AUTO, bool, "pack examples into rows without padding, each attending only to itself"
    )
    compile: Any = _knob(
        AUTO, bool, "torch.compile the feed-forward and norm modules (auto: on long CPU runs)"
    )
    seed: int = _knob(42, int, "seed for data order, splits and initialisation", auto=False)
    eval_every: Any = _knob(
        AUTO, int, "optimizer steps between evaluations (0 = only at end)", low=0
    )
    save_every: Any = _knob(
        AUTO, int, "optimizer steps between resumable checkpoints (0 = none)", low=0
    )
    keep_checkpoints: int = _knob(2, int, "newest checkpoints kept on disk", low=1, auto=False)
    log_to: list = _knob(
        ["tensorboard"], "trackers", "experiment trackers: tensorboard, wandb, mlflow", auto=False
    )
    memory_budget_gb: Any = _knob(
        AUTO, float, "memory training may use (auto: 80% of what is free)", low=0, low_open=True
    )
    probe_seconds: float = _knob(
        60.0, float, "time budget of the batch-size/precision probe", low=0, auto=False
    )


@dataclass
class DebugSettings:
    """Fault injection for tests and benchmarks/soak.py; never set these for real work."""

    nan_at: list = _knob([], "ints", "data positions whose gradients become NaN", auto=False)
    spike_at: list = _knob([], "ints", "data positions whose loss spikes", auto=False)
    overflow_fp16_from: Any = _knob(
        None, int, "from this position, fp16 gradients overflow", auto=False, nullable=True
    )
    oom_above: Any = _knob(
        None, int, "micro-batches above this size raise OOM", auto=False, nullable=True
    )
    probe_killed_above: Any = _knob(
        None,
        int,
        "CPU probe trials above this micro-batch are SIGKILLed, as the OOM killer would",
        auto=False,
        nullable=True,
    )
    kill_at_step: Any = _knob(None, int, "SIGKILL before this step", auto=False, nullable=True)
    sigterm_at_step: Any = _knob(
        None, int, "send SIGTERM to itself before this step", auto=False, nullable=True
    )
    kill_in_checkpoint: Any = _knob(
        None, int, "SIGKILL while writing this step's checkpoint", auto=False, nullable=True
    )
    disk_full_at_checkpoint: Any = _knob(
        None, int, "disk full while writing this step's checkpoint", auto=False, nullable=True
    )
    log_example_ids: bool = _knob(False, bool, "log example ids per step", auto=False)


@dataclass
class Config:
    model: str = _knob(
        "smollm2-135m-instruct", str, "bundled alias, HF dir, hub id or .gguf", auto=False
    )
    method: str = _knob("lora", str, "lora or full fine-tune", choices=METHODS, auto=False)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    debug: DebugSettings = field(default_factory=DebugSettings)
    output_dir: str | None = _knob(
        None, str, "run directory (default runs/<time>)", auto=False, nullable=True
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SECTIONS = {
    "lora": LoraSettings,
    "data": DataSettings,
    "train": TrainSettings,
    "debug": DebugSettings,
}
BUNDLED_RECIPE = "demo.yaml"


def bundled_recipe_path() -> Path:
    return Path(str(importlib.resources.files("tunepilot") / "recipes" / BUNDLED_RECIPE))


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, output_dir: str | None = None
) -> Config:
    """Read a YAML config (or the bundled demo recipe), apply overrides, validate.

    Relative data paths in a YAML file are relative to that file, so configs can be moved with
    their data; paths given with ``--set`` are relative to the working directory.
    """
    cfg_path = Path(path) if path is not None else bundled_recipe_path()
    label = str(path) if path is not None else f"bundled recipe {BUNDLED_RECIPE}"
    raw, lines = _read_yaml(cfg_path, label)
    _resolve_data_paths(raw, cfg_path.parent)
    # a value given on the command line is blamed on the command line, not on the file's line
    given = {_apply_override(raw, item): "--set" for item in overrides or []}
    if path is None and "data.train" in given and "data.eval" not in given:
        # the recipe's eval set belongs to its own training data: a user's data scored against
        # booking requests would read as a real evaluation; a seeded split of theirs is one
        raw.get("data", {}).pop("eval", None)
    if output_dir is not None:
        raw["output_dir"] = output_dir
        given["output_dir"] = "--output-dir"
    return validate(raw, label, lines, given)


#: files that hold training data, not a config: passed where the config goes, they are told so
DATA_SUFFIXES = {".jsonl", ".ndjson", ".csv", ".tsv", ".parquet", ".arrow"}


def _not_a_config(label: str, what: str) -> UserError:
    return UserError(
        f"{label}: {what}, not a config; train on it with --set data.train={label} "
        "(the bundled recipe's settings), or name it under data.train in a config YAML"
    )


def _read_yaml(path: Path, label: str) -> tuple[dict[str, Any], dict[str, int]]:
    if path.is_dir():
        raise UserError(
            f"{label}: a directory, not a config file; pass a model as --set model={label} "
            f"or saved data as --set data.train={label}"
        )
    if not path.is_file():
        raise UserError(f"{label}: no such config file; check the path")
    if path.suffix.lower() in DATA_SUFFIXES:
        raise _not_a_config(label, "a data file")
    try:
        text = path.read_text(encoding="utf-8-sig")
        raw = yaml.safe_load(text) or {}
        lines = _key_lines(yaml.compose(text))
    except UnicodeDecodeError as exc:
        raise UserError(f"{label}: not UTF-8 text ({exc.reason}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{label}:{mark.line + 1}" if mark else label
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{where}: invalid YAML ({problem}); fix the syntax") from None
    if isinstance(raw, list) and path.suffix.lower() == ".json":
        raise _not_a_config(label, "a JSON list (data)")
    if not isinstance(raw, dict):
        raise UserError(
            f"{label}: the config must be a mapping of keys (model, method, data, "
            f"train, ...), got {type(raw).__name__}"
        )
    return raw, lines


def _key_lines(node: Any, prefix: str = "") -> dict[str, int]:
    """Map dotted keys to 1-based YAML line numbers, for error messages."""
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            out[key] = key_node.start_mark.line + 1
            out.update(_key_lines(value_node, key + "."))
    return out


def _resolve_data_paths(raw: dict[str, Any], base: Path) -> None:
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    for key in ("train", "eval"):
        value = data.get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            data[key] = str(base / value)
    model = raw.get("model")
    if isinstance(model, str) and model.startswith(("./", "../")):
        raw["model"] = str(base / model)


def _apply_override(raw: dict[str, Any], item: str) -> str:
    """Set ``item`` (KEY=VALUE) in ``raw``; returns the dotted key."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item}: expected KEY=VALUE, e.g. --set train.max_steps=50")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {item}: {part} is not a section")
        node = child
    node[parts[-1]] = value
    return ".".join(parts)


def validate(
    raw: dict[str, Any],
    label: str = "config",
    lines: dict[str, int] | None = None,
    given: dict[str, str] | None = None,
) -> Config:
    """Build a Config from a raw mapping; raise one UserError listing every problem.

    ``given`` maps the dotted keys set on the command line to the option that set them.
    """
    lines = lines or {}
    given = given or {}
    problems: list[str] = []

    def where(key: str) -> str:
        if key in given:
            return f"{given[key]} {key}"
        line = lines.get(key)
        return f"{label}:{line}: {key}" if line else f"{label}: {key}"

    top = {f.name: f for f in fields(Config)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in top:
            problems.append(f"{where(str(key))}: unknown key{_did_you_mean(str(key), top)}")
        elif key in SECTIONS:
            values[key] = _section(SECTIONS[key], key, value, where, problems)
        else:
            values[key] = _check(top[key], key, value, where, problems)
    cfg = Config(**values)
    _cross_checks(cfg, where, problems)
    if problems:
        raise UserError(*problems)
    return cfg


def _section(cls: type, name: str, value: Any, where: Any, problems: list[str]) -> Any:
    if value is None:
        return cls()
    if not isinstance(value, dict):
        problems.append(f"{where(name)}: must be a mapping of keys, got {value!r}")
        return cls()
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, item in value.items():
        dotted = f"{name}.{key}"
        if key not in known:
            problems.append(f"{where(dotted)}: unknown key{_did_you_mean(str(key), known)}")
            continue
        kwargs[key] = _check(known[key], dotted, item, where, problems)
    return cls(**kwargs)


# what the Hugging Face Trainer, TRL and Axolotl call a knob that has another name here
OTHER_NAMES = {
    "lr": "learning_rate",
    "per_device_train_batch_size": "micro_batch_size",
    "micro_batch": "micro_batch_size",
    "batch_size": "micro_batch_size' (per forward pass) or 'global_batch_size",
    "num_train_epochs": "num_epochs",
    "epochs": "num_epochs",
    "lr_scheduler_type": "scheduler",
    "lr_scheduler": "scheduler",
    "bf16": "precision",
    "fp16": "precision",
    "max_seq_length": "max_length",
    "sequence_len": "max_length",
    "cutoff_len": "max_length",
    "optim": "optimizer",
    "save_steps": "save_every",
    "eval_steps": "eval_every",
    "save_total_limit": "keep_checkpoints",
    "report_to": "log_to",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
}


def _did_you_mean(key: str, known: dict[str, Any]) -> str:
    other = OTHER_NAMES.get(key.lower())
    if other is not None and other.split("'")[-1] in known:
        return f"; here it is called '{other}'"
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"{hint} (known: {', '.join(known)})" if not close else hint


def _check(f: Any, dotted: str, value: Any, where: Any, problems: list[str]) -> Any:
    """Validate one value against its field's metadata; return it normalised (or the default)."""
    meta = f.metadata
    if value is None and meta.get("nullable"):
        return None
    if isinstance(value, str) and value.strip().lower() == AUTO and meta.get("auto"):
        return AUTO
    if isinstance(value, str) and value.strip().lower() in meta.get("words", ()):
        return value.strip().lower()
    kind = meta["kind"]
    bad = f"{where(dotted)}: "
    if kind is bool:
        if not isinstance(value, bool):
            problems.append(bad + f"must be true, false or auto, got {value!r}")
            return f.default
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                problems.append(bad + f"must be a whole number{_or_auto(meta)}, got {value!r}")
                return f.default
    elif kind is float:
        if isinstance(value, str):
            value = _yaml11_float(value)  # PyYAML reads "2e-4" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(bad + f"must be a number{_or_auto(meta)}, got {value!r}")
            return f.default
        value = float(value)
    elif kind is str:
        if not isinstance(value, str) or not value.strip():
            problems.append(bad + f"must be a non-empty string{_or_auto(meta)}, got {value!r}")
            return f.default
        if meta["choices"] and value not in meta["choices"]:
            opts = ", ".join(meta["choices"]) + (", auto" if meta["auto"] else "")
            problems.append(
                bad + f"must be one of {opts}; got {value!r}"
                f"{_did_you_mean(value, dict.fromkeys(meta['choices']))}"
            )
            return f.default
        return value
    elif kind == "trackers":
        known = ("tensorboard", "wandb", "mlflow")
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(v in known for v in value):
            return value
        problems.append(bad + f"must be a list drawn from {', '.join(known)}, got {value!r}")
        return f.default
    elif kind == "ints":
        if isinstance(value, list) and all(isinstance(v, int) for v in value):
            return value
        problems.append(bad + f"must be a list of whole numbers, got {value!r}")
        return f.default
    elif kind is list:
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return value
        problems.append(bad + "must be 'all-linear' or a list of module names")
        return f.default
    return _check_range(f, value, bad, problems)


def _yaml11_float(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _or_auto(meta: Any) -> str:
    return " or auto" if meta.get("auto") else ""


def _check_range(f: Any, value: Any, bad: str, problems: list[str]) -> Any:
    meta = f.metadata
    low, high = meta["low"], meta["high"]
    if low is not None and (value < low or (meta["low_open"] and value == low)):
        op = ">" if meta["low_open"] else ">="
        problems.append(bad + f"must be {op} {low:g}, got {value!r}")
        return f.default
    if high is not None and (value > high or (meta["high_open"] and value == high)):
        op = "<" if meta["high_open"] else "<="
        problems.append(bad + f"must be {op} {high:g}, got {value!r}")
        return f.default
    return value


def _cross_checks(cfg: Config, where: Any, problems: list[str]) -> None:
    t = cfg.train
    if t.warmup_steps != AUTO and t.warmup_ratio != AUTO:
        problems.append(
            f"{where('train.warmup_steps')}: set either warmup_steps or warmup_ratio, "
            "not both (the other stays auto)"
        )
    gbs, mbs, acc = t.global_batch_size, t.micro_batch_size, t.gradient_accumulation_steps
    if AUTO not in (gbs, mbs, acc) and gbs != mbs * acc:
        problems.append(
            f"{where('train.global_batch_size')}: {gbs} != micro_batch_size {mbs} x "
            f"gradient_accumulation_steps {acc}; set global_batch_size and leave "
            "gradient_accumulation_steps auto"
        )
    elif gbs != AUTO and mbs != AUTO and gbs % mbs:
        problems.append(
            f"{where('train.global_batch_size')}: {gbs} is not a multiple of "
            f"micro_batch_size {mbs}; pick a global batch that micro-batches divide"
        )
    elif gbs != AUTO and acc != AUTO and gbs % acc:
        problems.append(
            f"{where('train.global_batch_size')}: {gbs} is not a multiple of "
            f"gradient_accumulation_steps {acc}"
        )
    if mbs != AUTO and gbs != AUTO and mbs > gbs:
        problems.append(f"{where('train.micro_batch_size')}: {mbs} > global_batch_size {gbs}")
    if t.max_steps == 0:
        problems.append(
            f"{where('train.max_steps')}: 0 trains nothing; use -1 or auto to train "
            "by num_epochs, or a positive number of steps"
        )
    if cfg.data.train is None:
        problems.append(
            f"{where('data.train')}: required; point it at a JSONL/JSON/CSV/Parquet "
            "file or a saved datasets directory"
        )
    for key in ("train", "eval"):
        value = getattr(cfg.data, key)
        if value is not None and not Path(value).expanduser().exists():
            # no suffix: a saved datasets directory, or a Hub id such as tatsu-lab/alpaca
            hint = (
                "; a Hugging Face Hub dataset is not downloaded here: save it with "
                "datasets' save_to_disk (or to JSONL) and point at that"
                if not Path(value).suffix
                else ""
            )
            problems.append(f"{where('data.' + key)}: {value}: no such file or directory{hint}")
    _check_model(cfg.model, where, problems)


def _check_model(model: str, where: Any, problems: list[str]) -> None:
    """A model that looks like a local path must exist; anything else may be an alias or hub id."""
    from tunepilot.model import BUNDLED_MODELS, missing_path  # late: model pulls in torch

    if missing_path(model):
        problems.append(
            f"{where('model')}: {model}: no such model file or directory; use a "
            f"local HF model dir, a .gguf file, a hub id or one of: "
            f"{', '.join(BUNDLED_MODELS)}"
        )


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
