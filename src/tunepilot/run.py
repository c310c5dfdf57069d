"""The pipeline: config -> hardware -> data -> plan -> model -> loop -> evaluate -> export.

``prepare`` does everything ``tunepilot plan`` needs (no weights are loaded); ``train`` follows
the plan and writes the run directory.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from tunepilot import distributed, hardware
from tunepilot import model as models
from tunepilot.config import AUTO, Config, dump_yaml, load_config
from tunepilot.data.formats import Example, common_system, detect_format, to_examples
from tunepilot.data.sources import read_rows
from tunepilot.data.tokenize import (
    Tokenized,
    ensure_chat_template,
    fingerprint,
    tokenize_examples,
)
from tunepilot.errors import UserError
from tunepilot.evaluate import eval_loss, exact_match, generation_batch
from tunepilot.export import save_adapter, save_merged
from tunepilot.plan import padding, probe
from tunepilot.plan.decision import Decision
from tunepilot.plan.lr_find import LRFindResult, StepSetup, find_learning_rate
from tunepilot.plan.memory import ModelShape
from tunepilot.plan.plan import Plan, build_plan
from tunepilot.plan.probe_worker import KILLED, ProbeWorker, in_worker
from tunepilot.plan.render import render_plan
from tunepilot.report import build_report
from tunepilot.rundir import RUN_OUTPUTS, hold, is_run_dir, read_plan, release_all
from tunepilot.train import checkpoint as ckpt
from tunepilot.train import frozen, matmul
from tunepilot.train.adapters import fuse_adapter_sums
from tunepilot.train.allocator import training_memory
from tunepilot.train.attention import use_packed_attention
from tunepilot.train.compiled import compiled
from tunepilot.train.loop import LoopInputs, train_loop
from tunepilot.train.progress import Reporter
from tunepilot.train.projections import share_inputs, shared
from tunepilot.train.rms_norm import fast_norms, use_fast_norms
from tunepilot.train.step import DTYPES
from tunepilot.train.trackers import Trackers
from tunepilot.train.trackers import check_available as check_trackers


@dataclass
class Prepared:
    cfg: Config
    source: models.ModelSource
    tokenizer: Any
    pad_added: bool
    train: list[Tokenized]
    eval: list[Tokenized]
    plan: Plan


def load_examples(cfg: Config) -> tuple[list[Example], list[Example], str, int]:
    """Train and eval examples, the format, and how many eval examples there were before the
    cap (``data.eval_max_examples``); without data.eval, a seeded split of train."""
    train_rows = read_rows(cfg.data.train)
    fmt = (
        cfg.data.format if cfg.data.format != "auto" else detect_format(train_rows, cfg.data.train)
    )
    train = to_examples(train_rows, fmt)
    if cfg.data.eval:
        eval_rows = read_rows(cfg.data.eval)
        eval_fmt = (
            cfg.data.format
            if cfg.data.format != "auto"
            else detect_format(eval_rows, cfg.data.eval)
        )
        eval_ = to_examples(eval_rows, eval_fmt)
    else:
        if len(train) < 2:
            raise UserError(
                f"{cfg.data.train}: {len(train)} example(s): too few to hold any "
                "out for evaluation; add data or set data.eval"
            )
        order = list(range(len(train)))
        random.Random(cfg.train.seed).shuffle(order)
        # held out up to what evaluations read: a 20,000-row file held out 2,000 rows and
        # scored 200, so 1,800 examples were neither trained on nor evaluated
        n_eval = min(max(1, round(cfg.data.eval_fraction * len(train))), cfg.data.eval_max_examples)
        eval_ = [train[i] for i in order[:n_eval]]
        train = [train[i] for i in sorted(order[n_eval:])]
    available, cap = len(eval_), cfg.data.eval_max_examples
    if available > cap:  # an eval file (a seeded split holds out no more than the cap)
        # a seeded sample in file order, not the file's first rows: eval files are often
        # sorted (by task, source or length), and their head would score one corner
        keep = sorted(random.Random(cfg.train.seed).sample(range(available), cap))
        eval_ = [eval_[i] for i in keep]
    return train, eval_, fmt, available


def model_shape(config: Any, total: int, trainable: int) -> ModelShape:
    text = getattr(config, "text_config", None) or config
    return ModelShape(
        total,
        trainable,
        text.hidden_size,
        text.num_hidden_layers,
        text.vocab_size,
        getattr(text, "max_position_embeddings", 2048),
    )


def prepare(
    cfg: Config, console: Console | None = None, recorded: dict[str, Any] | None = None
) -> Prepared:
    """Load tokenizer and data and build the plan; ``console`` gets a line as each batch-probe
    trial starts (one trial is three training steps: minutes for a large model on a CPU).
    ``recorded``: the data section of the plan of the run being resumed, which the data must
    still match."""
    hw = hardware.detect()
    source = models.resolve(cfg.model)
    model_config = models.load_config(source)  # first: a broken config.json is named as such
    tokenizer = models.load_tokenizer(source)
    pad = padding.decide_pad_token(tokenizer)
    pad_added = padding.apply_pad_token(tokenizer, pad.value)
    fallback_template = ensure_chat_template(tokenizer)
    train_ex, eval_ex, fmt, eval_available = load_examples(cfg)
    train = tokenize_examples(train_ex, tokenizer, models.cache_root())
    eval_ = tokenize_examples(eval_ex, tokenizer, models.cache_root())
    total, trainable = models.parameter_counts(source, cfg.method, cfg.lora)
    shape = model_shape(model_config, total, trainable)
    user_batch = cfg.train.global_batch_size
    if user_batch != AUTO and user_batch > len(train):
        raise UserError(
            f"{cfg.data.train}: {len(train)} training examples, fewer than "
            f"train.global_batch_size {user_batch}; lower the batch or add data"
        )
    model_info = {
        "name": cfg.model,
        "path": str(source.path),
        "method": cfg.method,
        "total_parameters": total,
        "trainable_parameters": trainable,
        "chat_template": "fallback (model has none)" if fallback_template else "model's",
    }
    data_info = {
        "format": fmt,
        "train_file": cfg.data.train,
        "eval_file": cfg.data.eval or f"{cfg.data.eval_fraction:g} split of train",
        "train_fingerprint": fingerprint(train),
        "eval_fingerprint": fingerprint(eval_),
    }
    if eval_available > len(eval_ex):
        data_info["eval_available"] = eval_available
    if system := common_system(train_ex):
        data_info["system_prompt"] = system
    if recorded is not None:
        check_same_data(recorded, data_info, len(train), len(eval_))
    # decided before the batch, so the probe measures the path training will take
    packing = padding.decide_packing(
        cfg.train.packing,
        models.supports_packing(model_config),
        hw.flash_attention,
        hw.varlen_attention,
    )
    measure = (
        Prober(cfg, source, tokenizer, pad_added, hw, packing.value, console, total)
        if needs_probe(cfg)
        else None
    )
    try:
        plan = build_plan(
            cfg, hw, shape, pad, train, eval_, data_info, model_info, measure, packing
        )
        if measure is not None:
            measure.save()
            if plan.probe:  # not when its first trial was too slow to start
                plan.probe["cached"] = measure.measured == 0
    finally:
        if measure is not None:
            measure.close()
    return Prepared(cfg, source, tokenizer, pad_added, train, eval_, plan)


def check_same_data(
    recorded: dict[str, Any], now: dict[str, Any], n_train: int, n_eval: int
) -> None:
    """A resumed run takes the examples at its next positions from the data as it is now (the
    order is a function of the seed and the position), so data edited since the run started
    would silently train on a different sequence, or skip and repeat examples, and its eval
    curve would change meaning halfway. Runs from before the fingerprints were recorded pass."""
    for split, count in (("train", n_train), ("eval", n_eval)):
        key = f"{split}_fingerprint"
        if key not in recorded or recorded[key] == now[key]:
            continue
        then = recorded.get(f"{split}_examples")
        counts = (
            f"{then} examples then and now, different tokens"
            if then == count
            else f"{then} examples then, {count} now"
        )
        raise UserError(
            f"{now[f'{split}_file']}: changed since this run started ({counts}); a resumed "
            "run must see the same data: restore it, or start a new run with another "
            "--output-dir"
        )


def needs_probe(cfg: Config) -> bool:
    t = cfg.train
    if t.gradient_accumulation_steps != AUTO or t.probe_seconds <= 0:
        return False
    return AUTO in (t.micro_batch_size, t.gradient_checkpointing, t.precision)


class Prober:
    """Measures training steps on the real model for the planner; remembers every answer.

    The model is loaded on the first measurement that is not already cached, so a cached plan
    never loads weights. Answers are cached per (model, method, hardware, budget). On a CPU the
    trials run in a worker process (plan/probe_worker.py): a trial the kernel kills for memory
    reads "does not fit" instead of ending the run, and what the trials leave resident goes
    with the worker instead of swelling the training that follows.
    """

    def __init__(
        self,
        cfg: Config,
        source: models.ModelSource,
        tokenizer: Any,
        pad_added: bool,
        hw: hardware.Hardware,
        packing: bool = False,
        console: Console | None = None,
        parameters: int = 0,
    ) -> None:
        self.cfg, self.source, self.hw, self.packing = cfg, source, hw, packing
        self.parameters = parameters  # the model's, for predicting the first trial's time
        self.console = console if distributed.is_main() else None  # trials announced here
        self.vocab = len(tokenizer)
        self.resize_to = self.vocab if pad_added else None
        self.model: torch.nn.Module | None = None  # in-process trials (CUDA)
        self.worker: ProbeWorker | None = None  # trials in a worker process (CPU)
        self.measured = 0
        t = cfg.train
        self.budget = (
            t.memory_budget_gb if t.memory_budget_gb != AUTO else 0.8 * (hw.memory_available_gb)
        )
        stat = _model_stat(source)
        self.key = probe.cache_key(
            {
                "model": str(source.path),
                "stat": stat,
                "method": cfg.method,
                "lora": [cfg.lora.r, cfg.lora.target_modules],
                "device": hw.device,
                "hw": hw.name,
                "memory": round(hw.memory_total_gb),
                "torch": torch.__version__,
                "oom_above": cfg.debug.oom_above,
                "probe_killed_above": cfg.debug.probe_killed_above,
                "packing": packing,
            }
        )
        cached = probe.load_cached(models.cache_root(), self.key)
        self.points = {
            self._k(p.micro_batch, p.max_length, p.precision, p.checkpointing): p
            for p in (cached.points if cached else [])
        }

    @staticmethod
    def _k(micro: int, length: int, precision: str, ckpt: bool) -> str:
        return f"{micro}/{length}/{precision}/{ckpt}"

    def __call__(self, micro: int, max_length: int, precision: str, ckpt: bool) -> probe.ProbePoint:
        key = self._k(micro, max_length, precision, ckpt)
        # ranks on other machines may have other caches; a trial agrees its results over all
        # ranks, so either every rank measures or none does
        if not distributed.all_ranks(key in self.points):
            if self.measured == 0 and self.hw.device == "cpu":
                self._check_first_trial(micro, max_length, precision)
            if self.console is not None:
                if self.measured == 0:
                    self.console.print(
                        "probe: timing training steps on the real model "
                        "(train.probe_seconds=0 plans from the memory model instead)",
                        highlight=False,
                    )
                recompute = ", checkpointing" if ckpt else ""
                self.console.print(
                    f"probe: {1 + probe.TIMED_STEPS} steps at {micro} x {max_length} tokens, "
                    f"{precision}{recompute}...",
                    highlight=False,
                )
            point = self._measure(micro, max_length, precision, ckpt)
            # every rank must reach the same plan: the slowest, fullest rank decides
            self.points[key] = replace(
                point,
                fits=bool(distributed.agree_min(int(point.fits))),
                tokens_per_s=distributed.agree_min(point.tokens_per_s),
                peak_gb=-distributed.agree_min(-point.peak_gb),
            )
            self.measured += 1
        # a measured peak is a fact; the budget is policy, applied to cached points too. Each
        # rank reads its own free and resting memory, so the verdict is agreed once more
        point = probe.within_budget(self.points[key], self.budget)
        return replace(point, fits=bool(distributed.agree_min(int(point.fits))))

    def _check_first_trial(self, micro: int, length: int, precision: str) -> None:
        """Raise ProbeTooSlow when the first trial would overrun train.probe_seconds: it cannot
        be cut short, and for a large model on a CPU it takes minutes. Predicted from its
        matmul FLOPs (6 per parameter and token for a full fine-tune, 4 for LoRA's frozen
        base) at this CPU's measured layer speed, which real steps do not beat: it errs short.
        Later trials are predicted from the speeds measured (probe.search_micro_batch)."""
        if not self.parameters:
            return
        flops = (6 if self.cfg.method == "full" else 4) * self.parameters * micro * length
        gflops = distributed.agree_min(hardware.cpu_layer_gflops(DTYPES[precision]))
        seconds = probe.TRIAL_STEPS * flops / (gflops * 1e9)
        budget = self.cfg.train.probe_seconds
        if seconds > budget:
            raise probe.ProbeTooSlow(
                f"the batch probe's first trial ({micro} x {length} tokens, {precision}) "
                f"would take ~{seconds:.0f} s at this CPU's {gflops:.0f} GFLOP/s, past "
                f"train.probe_seconds ({budget:g}); planned from the memory model instead "
                f"(raise train.probe_seconds to measure)"
            )

    def _measure(self, micro: int, max_length: int, precision: str, ckpt: bool) -> probe.ProbePoint:
        # the model training will train (checkpointing is switched per trial)
        setup = (
            self.cfg,
            self.source,
            self.resize_to,
            self.hw.device,
            self.packing,
            self.hw.flash_attention,
        )
        request = (
            self.cfg,
            self.hw,
            self.vocab,
            self.budget,
            self.packing,
            micro,
            max_length,
            precision,
            ckpt,
        )
        # CUDA's OOM is an exception and its cache is emptied; the worker needs POSIX (pass_fds)
        if self.hw.device != "cpu" or os.name != "posix":
            if self.model is None:
                self.model = trainable_model(*setup)
            return _probe_trial(self.model, *request)
        if self.worker is None:
            self.worker = ProbeWorker(trainable_model, setup, _probe_trial)
        point = self.worker.trial(*request)
        if point is None:
            code = self.worker.exitcode or 0
            why = "killed by the system" if code == KILLED else f"its process died ({code})"
            return probe.ProbePoint(
                micro, max_length, precision, ckpt, False, note=f"out of memory: {why}"
            )
        if point.peak_gb > 0:
            # the run's process holds more than the worker's libraries (tokenized data, the
            # tokenizer): add it, so the peak bounds the run's own
            resting = hardware.resident_bytes() / 2**30
            beyond = max(0.0, resting - self.worker.base_bytes / 2**30)
            point = replace(
                point, peak_gb=round(point.peak_gb + beyond, 3), resting_gb=round(resting, 3)
            )
        return point

    def save(self) -> None:
        if self.measured and distributed.is_main():  # every rank measured the same answer
            probe.store_cached(
                models.cache_root(), self.key, probe.ProbeResult(list(self.points.values()))
            )
        self.close()

    def close(self) -> None:
        """Free the probe's model: the worker exits, or the in-process copy is dropped."""
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        self.model = None


def _probe_trial(
    model: torch.nn.Module,
    cfg: Config,
    hw: hardware.Hardware,
    vocab: int,
    budget: float,
    packing: bool,
    micro: int,
    max_length: int,
    precision: str,
    ckpt: bool,
) -> probe.ProbePoint:
    if ckpt:
        models.enable_gradient_checkpointing(model)
    try:
        return probe.measure(
            model,
            micro,
            max_length,
            precision,
            ckpt,
            hw.device,
            vocab,
            budget,
            _fault(cfg.debug.oom_above, cfg.debug.probe_killed_above, hw.device),
            packing,
        )
    finally:
        if ckpt:
            model.activation_checkpointing_disable()


def _model_stat(source: models.ModelSource) -> list:
    """Sizes and mtimes of the weight files: a changed model invalidates cached probes."""
    path = Path(str(source.path))
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = [*sorted(path.glob("*.safetensors")), path / "config.json"]
    else:
        files = []
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.exists()]


def _fault(oom_above: int | None, killed_above: int | None, device: str) -> Any:
    """Injected failures above a micro-batch: a failed allocation, or the kernel's SIGKILL
    (a CPU out of memory under the default overcommit), which only a probe worker survives."""
    if oom_above is None and killed_above is None:
        return None

    def fault(micro: int) -> None:
        if killed_above is not None and micro > killed_above:
            if not in_worker():
                raise RuntimeError("debug.probe_killed_above needs the probe's worker process")
            os.kill(os.getpid(), signal.SIGKILL)
        if oom_above is not None and micro > oom_above:
            hardware.fail_allocation(device)

    return fault


def resolved_config(cfg: Config, plan: Plan) -> dict[str, Any]:
    """The config with every ``auto`` replaced by the plan's value: re-running it reproduces
    the run without re-deciding anything."""
    data = cfg.to_dict()
    # absolute paths: the file lives in the run dir, and relative paths in a config are read
    # relative to the config's own folder (a resumed run would look for its data there)
    for key in ("train", "eval"):
        if data["data"][key]:
            data["data"][key] = str(Path(data["data"][key]).absolute())
    if Path(cfg.model).exists():
        data["model"] = str(Path(cfg.model).absolute())
    for key in data["train"]:
        if key in plan.knobs:
            data["train"][key] = plan[key]
    data["train"]["warmup_ratio"] = AUTO  # warmup_steps now carries it
    # derived from the global and micro-batch and the number of processes, so that the run can
    # be resumed with another number of processes
    data["train"]["gradient_accumulation_steps"] = AUTO
    return data


def run_dir_for(cfg: Config) -> Path:
    return Path(cfg.output_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))


def find_resume(run_dir: Path, resume: bool, console: Console) -> Path | None:
    """The checkpoint to continue from, if this output dir holds an unfinished run.

    Re-running the same command on the same output dir continues it; ``--resume`` insists.
    """
    finished = (run_dir / "eval.json").is_file() and "after" in json.loads(
        (run_dir / "eval.json").read_text() or "{}"
    )
    if finished:
        raise UserError(
            f"output_dir: {run_dir} already holds a finished run; pass another --output-dir "
            "or remove it"
        )
    if not (run_dir / "plan.json").exists():
        if resume:
            raise UserError(f"--resume: {run_dir} holds no run to resume")
        return None
    hold(run_dir)  # before anything is cleaned: another process may be writing it now
    ckpt.clean_partial(run_dir)
    found = ckpt.latest_valid(
        run_dir, report=lambda msg: console.print(f"[yellow]warning:[/] {msg}", highlight=False)
    )
    if found is None and resume:
        raise UserError(
            f"--resume: {run_dir} has no usable checkpoint; run without --resume to start over"
        )
    if found is None:
        console.print(
            f"{run_dir} holds an unfinished run without a checkpoint: starting over",
            highlight=False,
        )
    return found


def check_run_dir(run_dir: Path, writes: tuple[str, ...] = RUN_OUTPUTS) -> None:
    """Fail before planning (the batch probe can take minutes) where the run directory cannot
    be made: an existing file in its place, or a nearest existing folder that is not writable;
    or where a folder that is not a run holds what the command ``writes``."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(
            f"output_dir: {run_dir}: a file is in the way, not a directory; pass another "
            "--output-dir"
        )
    nearest = next(p for p in (run_dir.absolute(), *run_dir.absolute().parents) if p.exists())
    if not nearest.is_dir():
        raise UserError(
            f"output_dir: {run_dir}: {nearest} is a file, not a directory; pass another "
            "--output-dir"
        )
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise UserError(
            f"output_dir: {run_dir}: {nearest} is not writable; pass another --output-dir"
        )
    if run_dir.is_dir() and not is_run_dir(run_dir):
        # a folder of the user's own (their config, their base model's model/, their logs) is
        # not a run's: writing the run into it would replace those files without a word
        clash = [name for name in writes if (run_dir / name).exists()]
        if clash:
            shown = ", ".join(n + "/" if (run_dir / n).is_dir() else n for n in clash)
            raise UserError(
                f"output_dir: {run_dir} is not a tunepilot run but holds {shown}, which the "
                "run would overwrite; pass a new or empty --output-dir"
            )


def make_run_dir(run_dir: Path) -> Path:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"output_dir: {run_dir}: cannot create ({exc.strerror})") from None
    return run_dir


def truncate_log(path: Path, last_step: int) -> None:
    """Drop records a killed run wrote after its last checkpoint: they will be redone."""
    if not path.is_file():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= last_step
    ]
    path.write_text("".join(line + "\n" for line in keep))


def load_trainable(
    cfg: Config, source: models.ModelSource, resize_to: int | None = None, fast: bool = True
) -> torch.nn.Module:
    """The model with the method applied (LoRA adapters or everything trainable);
    ``resize_to`` is the tokenizer's length when a pad token was added to it. ``fast=False``
    leaves the layers as transformers and peft build them (the same weights, without
    tunepilot's norms, shared matmuls, fused adapter sums and oneDNN products): the
    benchmarks' Trainer and TRL runs, as users run them."""
    torch.manual_seed(cfg.train.seed)
    model = models.load_model(source)
    if resize_to is not None:
        model.resize_token_embeddings(resize_to)
    if fast:
        use_fast_norms(model)
    if cfg.method == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        lora = cfg.lora
        model = models.add_lora(model, lora.r, lora.alpha, lora.dropout, lora.target_modules)
        if fast:
            fuse_adapter_sums(model)
    if fast:
        share_inputs(model, torch.arange(4).unsqueeze(0))  # after LoRA: its layers group too
        matmul.route(model)  # the rest: fp32 products on oneDNN where it is faster here
    return model


def resized_vocab(prep: Prepared) -> int | None:
    return len(prep.tokenizer) if prep.pad_added else None


def build_model(prep: Prepared, device: str) -> torch.nn.Module:
    plan = prep.plan
    return trainable_model(
        prep.cfg,
        prep.source,
        resized_vocab(prep),
        device,
        plan["packing"],
        plan.hardware.flash_attention,
        plan["gradient_checkpointing"],
    )


def trainable_model(
    cfg: Config,
    source: models.ModelSource,
    resize_to: int | None,
    device: str,
    packing: bool,
    flash_attention: bool,
    checkpointing: bool = False,
) -> torch.nn.Module:
    """The model training trains, on ``device``; the batch probe's trials train it too."""
    model = load_trainable(cfg, source, resize_to)
    if checkpointing:
        models.enable_gradient_checkpointing(model)
    if packing:
        use_packed_attention(model, flash_attention)
    return model.to(device)


def evaluate_all(model: Any, prep: Prepared, device: str) -> dict[str, Any]:
    plan = prep.plan
    args = (plan["precision"], device)
    loss = eval_loss(
        model,
        prep.eval,
        plan.data["eval_max_length"],
        prep.tokenizer.pad_token_id,
        plan["micro_batch_size"],
        *args,
        max_tokens=plan["micro_batch_size"] * plan["max_length"],
    )
    prep.tokenizer.padding_side = "left"
    width = generation_batch(model, prep.eval, plan["precision"], plan.memory["budget_gb"])
    em = exact_match(model, prep.tokenizer, prep.eval, width, *args)
    prep.tokenizer.padding_side = "right"
    return {"loss": loss, "exact_match": em.to_dict() if em else None}


def open_run(cfg: Config, resume: bool, console: Console) -> tuple[Path, Path | None, Config]:
    """The run directory, the checkpoint to resume from (if any) and the config to follow."""
    run_dir = run_dir_for(cfg)
    check_run_dir(run_dir)
    resume_from = find_resume(run_dir, resume, console)
    if resume_from is not None:
        # the run's own resolved config: every knob as it was decided, so the plan is identical
        debug = cfg.debug
        cfg = load_config(run_dir / "config.yaml", output_dir=str(run_dir))
        cfg.debug = debug
        console.print(
            f"resuming {run_dir} from {resume_from.name} (using {run_dir}/config.yaml)",
            highlight=False,
        )
    return run_dir, resume_from, cfg


def train(
    cfg: Config,
    console: Console,
    quiet: bool = False,
    resume: bool = False,
    on_eval: Callable[[int, float], None] | None = None,
) -> Path:
    """Plan, train, evaluate and export into the run directory; returns it. The directory is
    held against other tunepilot processes from when it is made (or found) until this ends."""
    try:
        return _train(cfg, console, quiet, resume, on_eval)
    finally:
        release_all()


def _train(
    cfg: Config,
    console: Console,
    quiet: bool,
    resume: bool,
    on_eval: Callable[[int, float], None] | None,
) -> Path:
    """``train``'s body.

    In a distributed run every rank calls this; rank 0 alone writes files and prints (the
    other ranks' consoles are quiet). ``on_eval(step, eval_loss)`` is called after each
    periodic evaluation (``tunepilot sweep`` reports to its pruner there); an exception it
    raises ends the run unfinished.
    """
    # rank 0 alone looks at the output dir and every rank follows its answer: the same
    # directory (the default name is a timestamp), resume point and config
    run_dir, resume_from, cfg = distributed.from_main(lambda: open_run(cfg, resume, console))
    main = distributed.is_main()
    check_trackers(cfg.train.log_to)
    # the data section of the plan the run started with, which the data must still match
    recorded = (
        distributed.from_main(lambda: read_plan(run_dir).get("data", {})) if resume_from else None
    )
    prep = prepare(cfg, console, recorded)
    plan = prep.plan
    render_plan(plan, console, sample=(prep.train[0], prep.tokenizer))
    if main:
        hold(make_run_dir(run_dir))
    device = plan.hardware.device
    model = build_model(prep, device)
    if resume_from is None and cfg.train.learning_rate == "find":
        # measured once, on rank 0, so that every rank trains at the same rate
        found = distributed.from_main(lambda: find_lr(model, prep, run_dir, console))
        plan.knobs["learning_rate"] = Decision(found.chosen, "auto", found.reason)
        console.print(f"learning_rate = {found.chosen:.3g}: {found.reason}", highlight=False)
    if resume_from is None:
        if main:
            (run_dir / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
            (run_dir / "config.yaml").write_text(dump_yaml(resolved_config(cfg, plan)))
            for stale in ("metrics.jsonl", "events.jsonl"):
                (run_dir / stale).unlink(missing_ok=True)
        console.print("evaluating before training...", highlight=False)
        before = evaluate_all(model, prep, device)
        if main:
            (run_dir / "eval.json").write_text(json.dumps({"before": before}, indent=2) + "\n")
    else:
        before = distributed.from_main(
            lambda: json.loads((run_dir / "eval.json").read_text())["before"]
        )
        if main:
            truncate_log(run_dir / "metrics.jsonl", ckpt.load(resume_from).progress.step)
    _print_eval(console, "before", before)
    tracked = resolved_config(cfg, plan)["train"]
    trackers = Trackers(cfg.train.log_to if main else [], run_dir, tracked)
    metrics = run_dir / "metrics.jsonl" if main else Path(os.devnull)
    reporter = Reporter(metrics, plan["total_steps"], quiet, console, trackers)
    if resume_from is None:
        reporter.log({"step": 0, "eval_loss": before["loss"]}, show=False)
    inputs = LoopInputs(
        model,
        plan,
        prep.train,
        prep.eval,
        prep.tokenizer.pad_token_id,
        device,
        cfg.train.seed,
        run_dir,
        reporter,
        bf16_available=plan.hardware.bf16,
        in_memory_rollback=cfg.method == "lora",
        keep_checkpoints=cfg.train.keep_checkpoints,
        resume_from=resume_from,
        debug=cfg.debug,
        on_eval=on_eval,
        # wrapped only now: the LR finder above ran on rank 0's bare model
        replica=distributed.wrap(model, cfg.method, device),
    )
    try:
        # after the probe and the LR finder: kept memory would inflate the RSS they measure
        with (
            training_memory(device) as host_memory,
            compiled(model, plan["compile"], plan["precision"], device) as compute,
        ):
            layers, matmuls = shared(model)
            console.print(
                f"host memory: {host_memory}; compute: {compute}; "
                f"{fast_norms(model)} RMSNorms with a hand-written backward; "
                f"{layers} linear layers sharing {matmuls} matmuls",
                highlight=False,
            )
            result = train_loop(inputs)
    finally:
        reporter.close()
        frozen.restore(model)  # fp32 base weights again: merging and export need them
    after = evaluate_all(model, prep, device)
    # a sharded model's whole weights are gathered to rank 0 (every rank takes part)
    weights = distributed.full_state(model)[0] if distributed.sharded(model) else None
    if main:
        _finish(cfg, prep, model, weights, run_dir, result, before, after, console)
    distributed.barrier()  # no rank leaves (and tears the job down) before the outputs exist
    return run_dir


def _finish(
    cfg: Config,
    prep: Prepared,
    model: torch.nn.Module,
    weights: dict[str, torch.Tensor] | None,
    run_dir: Path,
    result: Any,
    before: dict[str, Any],
    after: dict[str, Any],
    console: Console,
) -> None:
    """Rank 0's part of the end of a run: eval.json, adapter, merged model, report."""
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": result.steps, "eval_loss": after["loss"]}) + "\n")
    _print_eval(console, "after", after)
    summary = {
        "before": before,
        "after": after,
        "steps": result.steps,
        "train_seconds": round(result.seconds, 1),
        "real_tokens_per_s": round(result.real_tokens / max(result.seconds, 1e-9), 1),
        "eval_losses": result.eval_losses,
    }
    (run_dir / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    if cfg.method == "lora":
        save_adapter(model, run_dir / "adapter")
    save_merged(model, prep.tokenizer, run_dir / "model", weights)
    console.print(
        f"\ntrained {result.steps} steps in {result.seconds:.0f}s; outputs in {run_dir}/",
        highlight=False,
    )
    console.print(
        f"  model/ loads with AutoModelForCausalLM.from_pretrained('{run_dir}/model')",
        highlight=False,
    )
    console.print(f"  report: {build_report(run_dir)}", highlight=False)
    if "tensorboard" in cfg.train.log_to:
        console.print(f"  tensorboard --logdir {run_dir / 'tensorboard'}", highlight=False)


def find_lr(
    model: torch.nn.Module, prep: Prepared, out_dir: Path, console: Console
) -> LRFindResult:
    """LR range test then a held-out mini-sweep (plan/lr_find.py); the model comes back exactly."""
    setup = StepSetup.from_plan(
        prep.plan, prep.cfg.method, prep.tokenizer.pad_token_id, prep.cfg.train.seed
    )
    return find_learning_rate(
        model,
        prep.train,
        prep.eval,
        setup,
        out_dir=out_dir,
        log=lambda msg: console.print(msg, highlight=False),
    )


def lr_find(cfg: Config, console: Console) -> Path:
    """``tunepilot lr-find``: the finder on its own, results and plot in the output dir."""
    out_dir = Path(cfg.output_dir or Path("runs") / f"lr-find-{time.strftime('%Y%m%d-%H%M%S')}")
    check_run_dir(out_dir, writes=())  # lr_find.json and .png only, its own
    prep = prepare(cfg, console)
    make_run_dir(out_dir)
    model = build_model(prep, prep.plan.hardware.device)
    found = find_lr(model, prep, out_dir, console)  # prints each sweep rate's loss as it goes
    console.print(
        f"learning_rate: {found.chosen:.3g}\n  {found.reason}\n  results and plot in "
        f"{out_dir}/ (lr_find.json, lr_find.png); use it with --set "
        f"train.learning_rate={found.chosen:.3g}",
        highlight=False,
    )
    return out_dir


def _print_eval(console: Console, label: str, result: dict[str, Any]) -> None:
    em = result["exact_match"]
    acc = f", exact match {em['correct']}/{em['total']} ({em['accuracy']:.0%})" if em else ""
    console.print(f"eval {label}: loss {result['loss']:.4f}{acc}", highlight=False)
