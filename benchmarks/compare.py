"""tunepilot vs the Hugging Face Trainer and TRL's SFTTrainer: the same job, side by side.

Every engine trains the bundled SmolLM2-135M-Instruct (or --model) on the same long-tailed chat
set (benchmarks/longtail.py), from the same tokenized examples and the same initial weights
(LoRA included; the Trainer and TRL get the layers transformers and peft build, as users run
them, since session 25: before, their model carried tunepilot's RMSNorm backward, shared matmuls
and fused adapter sums), with the same global batch, learning rate, schedule, clipping,
precision and number of steps; the Trainer variants without their own sampler see the examples
in tunepilot's order, so their loss curves must match tunepilot's. Each run is a fresh
subprocess, timed from the end of its first step to the end of its last (model loading, planning
and evaluation excluded for everyone); peak RSS is the process's high-water mark from the start
of training to the end of its last step (the loaded model included; loading transients,
tunepilot's batch probe and writing outputs excluded: the baselines are told to save nothing).
Runs before session 11 counted from the process start, so the `auto` rows that probed showed the
probe's peak. On a CUDA GPU every engine trains there, and the memory column is the GPU's peak
allocated memory (torch.cuda.max_memory_allocated) instead of RSS.

Columns: real (non-pad) tokens/s, the ratio to the default Trainer, padding share of processed
tokens, peak RSS and its ratio, MFU on real tokens against this machine's matmul peak (measured
here, same threads, before and after the runs: the higher), the largest relative loss
difference to tunepilot over the steps both ran in the same order, and whether packed
sequences were isolated from each other (checked by
comparing each sequence's loss in the engine's own packed batch with its loss alone).

    python benchmarks/compare.py [--steps 8] [--rows 512] [--methods lora,full]
                                 [--precision fp32|bf16] [--quick] [--only NAMES]
                                 [--window all|after-first] [--repeat N] [--json out.json]
                                 [--model NAME_OR_DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tunepilot.train.allocator import preload_env, tcmalloc_loaded

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

GLOBAL_BATCH = 8
# timed window: "all" steps from the start of training (group_by_length puts its longest batch
# first, so leaving out step 1 flatters it), or "after-first" (leaves out warm-up)
WINDOW = os.environ.get("BENCH_WINDOW", "all")
MAX_LENGTH = 1024
LR = 1e-4
SEED = 42

# (engine, variant, options); "same" runs tunepilot with the baseline's fixed settings
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("trainer", "default (dynamic padding)", {}),
    ("trainer", "group_by_length", {"group_by_length": True}),
    ("trainer", "group_by_length + grad ckpt", {"group_by_length": True, "ckpt": True}),
    # the Trainer's own torch.compile (the whole model), against tunepilot's compiled modules
    ("trainer", "group_by_length + torch_compile", {"group_by_length": True, "compile": True}),
    # tcmalloc lent to the Trainer, as tunepilot's CLI preloads it for itself when installed
    ("trainer", "group_by_length + tcmalloc", {"group_by_length": True, "tcmalloc": True}),
    ("trl", "padding_free", {"padding_free": True}),
    ("trl", "packing bfd", {"packing": "bfd"}),
    ("trl", "packing wrapped", {"packing": "wrapped"}),
    ("tunepilot", "same settings", {}),
    ("tunepilot", "same settings + compile", {"compile": True}),
    # what tcmalloc (preloaded by the CLI when installed) is worth to tunepilot
    ("tunepilot", "same settings + system malloc", {"system_malloc": True}),
    ("tunepilot", "auto (own choices)", {"auto": True}),
]
QUICK = {"default (dynamic padding)", "group_by_length", "packing bfd", "same settings"}


# -- the parent: run every variant in its own process, print the table ----------------------


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One variant in a fresh interpreter; returns its result and wall time."""
    out = Path(spec["work"]) / f"result-{spec['key']}.json"
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    env = None  # the Trainer and TRL run as users start them: the system's malloc
    tunepilot = spec["engine"] == "tunepilot" and not spec["options"].get("system_malloc")
    if tunepilot or spec["options"].get("tcmalloc"):
        # as `tunepilot train` restarts itself (train/allocator.py): tcmalloc when installed
        env = preload_env(os.environ)
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    _, status, _ = os.wait4(proc.pid, 0)
    stderr = proc.stderr.read() if proc.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not out.exists():
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        return {"error": f"exit {code}: {tail[-300:]}"}
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def matmul_peak(precision: str, where: str) -> tuple[float, str]:
    """GFLOP/s of a large matmul at this precision, in a fresh process with the same threads
    (on a GPU: an 8192-square product, fp32 with TF32 off, as the engines train), and how it
    was reached. On a CPU the faster of PyTorch's default product (MKL at fp32, oneDNN at bf16)
    and oneDNN's, which tunepilot uses at fp32 where it is faster (train/matmul.py): a peak
    is what the machine can do, and on an AMD EPYC MKL's fp32 product runs at half of it."""
    n = 8192 if where == "cuda" else 2048
    code = (
        "import torch,time\n"
        f"d={'torch.bfloat16' if precision == 'bf16' else 'torch.float32'}\n"
        f"a=torch.randn({n},{n},dtype=d,device='{where}');b=torch.randn_like(a)\n"
        "s=torch.cuda.synchronize if a.is_cuda else (lambda: None)\n"
        "def rate(f):\n"
        "    for _ in range(3): f()\n"
        "    s();k=0;t=time.perf_counter()\n"
        "    while time.perf_counter()-t<3: f();k+=1;s()\n"
        f"    return 2*{n}**3*k/(time.perf_counter()-t)/1e9\n"
        "print(rate(lambda: a@b))\n"
        "lin=getattr(torch.ops.mkldnn,'_linear_pointwise',None)\n"
        "bt=b.t().contiguous()\n"
        "if lin is not None and not a.is_cuda: print(rate(lambda: lin(a,bt,None,'none',[],'')))\n"
    )
    out = subprocess.check_output([sys.executable, "-c", code], text=True)
    rates = [float(x) for x in out.split()]
    if len(rates) == 1:
        return rates[0], "PyTorch's product"
    default, onednn = rates
    how = f"the faster of PyTorch's default product, {default:.0f}, and oneDNN's, {onednn:.0f}"
    return max(rates), how


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--quick", action="store_true", help="four variants per method")
    parser.add_argument("--only", default="", help="comma-separated variant names")
    parser.add_argument("--json", type=Path, help="also write every result here")
    parser.add_argument(
        "--window", choices=("all", "after-first"), default="all", help="steps timed"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per variant, in interleaved rounds; medians"
    )
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="bundled name or model directory"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the data and run directories (deleted otherwise)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    os.environ["BENCH_WINDOW"] = args.window  # the workers read it
    import longtail

    work = Path(tempfile.mkdtemp(prefix="tunepilot-bench-"))
    data = longtail.write(work / "train.jsonl", args.rows, seed=0)
    (work / "eval.jsonl").write_text(
        "".join(json.dumps({"text": f"held-out line {i}."}) + "\n" for i in range(4))
    )
    where = device()
    peak_before, how = matmul_peak(args.precision, where)
    n_params = matmul_params(args.model)
    machine = _gpu_name() if where == "cuda" else f"{os.cpu_count()} threads"
    print(f"model: {args.model}; device: {where} ({machine})")
    print(
        f"matmul peak ({args.precision}, {machine}), before the runs: {peak_before:.0f} GFLOP/s "
        f"({how})"
    )
    print(
        f"data: {args.rows} long-tailed chat rows in {data} (deleted at the end without --keep); "
        f"{args.steps} steps of "
        f"{GLOBAL_BATCH} examples; lr {LR}; max_length {MAX_LENGTH}; timed: {args.window} steps\n",
        flush=True,
    )
    chosen = [v for v in VARIANTS if not args.quick or v[1] in QUICK]
    if args.only:
        chosen = [v for v in chosen if v[1] in args.only.split(",")]
    try:
        runs = _run_all(args, chosen, work, data, where)
    finally:
        # each variant's run directory holds its model weights: a run of the whole table left
        # 2-4 GB behind, and a few of them filled this machine's disk mid-benchmark
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    # measured again and the higher kept: a peak is what the machine can do, and whatever else
    # runs during a 3-second measurement only lowers it, inflating every MFU in the table (one
    # Zen 5 machine kind measured 669-770 GFLOP/s at bf16 across runs on one day)
    peak_after, how = matmul_peak(args.precision, where)
    peak = max(peak_before, peak_after)
    print(
        f"\nmatmul peak after the runs: {peak_after:.0f} GFLOP/s ({how}); MFU below uses {peak:.0f}"
    )
    results = [_median(same) for same in runs.values()]
    table(results, peak, args.precision, n_params, where)
    if args.json:
        args.json.write_text(json.dumps({"peak_gflops": peak, "results": results}, indent=2))
    return 0


def _run_all(
    args: argparse.Namespace, chosen: list, work: Path, data: Path, where: str
) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    runs: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    # rounds, not back-to-back repeats: a slow spell of a shared machine hits every variant
    for round_ in range(args.repeat):
        for method in args.methods.split(","):
            for index, (engine, variant, options) in enumerate(chosen):
                spec = {
                    "key": f"{method}-{engine}-{index}-{round_}",
                    "work": str(work),
                    "data": str(data),
                    "eval": str(work / "eval.jsonl"),
                    "engine": engine,
                    "variant": variant,
                    "options": options,
                    "method": method,
                    "precision": args.precision,
                    "steps": args.steps,
                    "model": args.model,
                    "device": where,
                }
                print(f"  {method:4} {engine:9} {variant} ...", end="", flush=True)
                result = run_worker(spec) | {"method": method, "engine": engine, "variant": variant}
                runs.setdefault((method, engine, variant), []).append(result)
                print(f" {_short(result)}", flush=True)
    return runs


def _median(same: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's runs as one row: median speed and memory, and their spread."""
    ok = [r for r in same if "error" not in r]
    if not ok:
        return same[0]
    speeds = sorted(r["tokens_per_s"] for r in ok)
    middle = sorted(ok, key=lambda r: r["tokens_per_s"])[(len(ok) - 1) // 2]
    return middle | {
        "tokens_per_s": statistics.median(speeds),
        "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in ok),
        "runs": len(ok),
        "spread": (speeds[-1] - speeds[0]) / statistics.median(speeds),
    }


def _short(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"failed: {r['error']}"
    return f"{r['tokens_per_s']:.0f} tok/s, {r['peak_rss_gb']:.1f} GB, {r['wall_s']:.0f}s wall"


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def table(
    results: list[dict[str, Any]], peak: float, precision: str, n_params: int, where: str
) -> None:
    memory = "peak GPU memory" if where == "cuda" else "peak RSS"
    print()
    print(
        f"| method | engine | variant | real tok/s | spread | vs Trainer | real tok/step | "
        f"padding | {memory} | memory vs Trainer | MFU | loss Δ vs tunepilot | "
        "sequences isolated |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for method in dict.fromkeys(r["method"] for r in results):
        rows = [r for r in results if r["method"] == method]
        base = next(
            (r for r in rows if r["variant"].startswith("default") and "error" not in r), None
        )
        ref = next((r for r in rows if r["variant"] == "same settings" and "error" not in r), None)
        for r in rows:
            if "error" in r:
                print(
                    f"| {method} | {r['engine']} | {r['variant']} | failed: "
                    f"{r['error'][:80]} |||||||||"
                )
                continue
            # Without a default-Trainer row in the run there is nothing to divide by.
            speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "n/a"
            rss = f"{r['peak_rss_gb'] / base['peak_rss_gb']:.2f}x" if base else "n/a"
            flops_per_token = (6 if method == "full" else 4) * n_params
            mfu = r["tokens_per_s"] * flops_per_token / (peak * 1e9)
            delta = _loss_delta(r, ref) if r.get("same_order") and ref and r is not ref else ""
            variant, mfu_cell = r["variant"], f"{mfu:.1%}"
            if "choices" in r and r["variant"].startswith("auto"):
                c = r["choices"]
                packing = "packing" if c["packing"] else "padding"
                variant += f": {c['precision']}, micro-batch {c['micro_batch_size']}, {packing}"
                if c["precision"] != precision:  # this run measured the other precision's peak
                    mfu_cell = f"n/a (ran {c['precision']})"
            print(
                f"| {method} | {r['engine']} | {variant} | {r['tokens_per_s']:.0f} | "
                f"{r['spread']:.0%} | {speed} | {r.get('tokens_per_step', 0):.0f} | "
                f"{r['padding']:.1%} | "
                f"{r['peak_rss_gb']:.2f} GB | {rss} | "
                f"{mfu_cell} | {delta} | {r.get('isolated', '')} |"
            )
    with_tcmalloc = sorted({f"{r['engine']} {r['variant']}" for r in results if r.get("tcmalloc")})
    tcmalloc_rows = ", ".join(with_tcmalloc) or "none"
    print(f"\nhost malloc: tcmalloc for {tcmalloc_rows}; the system's for the rest")
    print(
        f"precision {precision}; MFU = real tokens/s x FLOPs per token (6N full, 4N LoRA: "
        f"frozen weights need no weight gradient; N = parameters in matmuls) / matmul peak; "
        f"tok/s and memory are medians over the runs, spread = (fastest - slowest) / median; "
        f"real tok/step: the timed steps' mean (group_by_length and TRL's packing train "
        f"different examples in these steps from the rest; where a step's time hardly "
        f"depends on its tokens, as on a GPU waiting on the host, tok/s follows tok/step)"
    )


def _loss_delta(r: dict[str, Any], ref: dict[str, Any]) -> str:
    pairs = [
        abs(a - b) / max(abs(b), 1e-9)
        for a, b in zip(r["losses"], ref["losses"], strict=False)
        if math.isfinite(a) and math.isfinite(b)
    ]
    return f"{max(pairs):.1e}" if pairs else "n/a"


# -- the worker: one engine, one variant --------------------------------------------------


def worker(spec: dict[str, Any]) -> int:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    fn = {"tunepilot": run_tunepilot, "trainer": run_trainer, "trl": run_trl}[spec["engine"]]
    result = fn(spec) | {"tcmalloc": tcmalloc_loaded()}
    Path(spec["work"], f"result-{spec['key']}.json").write_text(json.dumps(result))
    return 0


def _overrides(spec: dict[str, Any], auto: bool) -> list[str]:
    fixed = [
        f"data.train={spec['data']}",
        f"data.eval={spec['eval']}",
        f"method={spec['method']}",
        f"train.global_batch_size={GLOBAL_BATCH}",
        f"train.max_steps={spec['steps']}",
        f"train.learning_rate={LR}",
        "train.scheduler=cosine",
        "train.warmup_steps=1",
        "train.weight_decay=0.0",
        "train.max_grad_norm=1.0",
        f"train.seed={SEED}",
        f"model={spec.get('model', 'smollm2-135m-instruct')}",
        "train.eval_every=0",
        "train.save_every=0",
        "train.log_to=[]",
    ]
    if auto:  # its own precision, micro-batch, checkpointing and packing; the same work
        return [*fixed, f"train.max_length={MAX_LENGTH}"]
    return [
        *fixed,
        f"train.max_length={MAX_LENGTH}",
        "train.micro_batch_size=8",
        f"train.precision={spec['precision']}",
        "train.gradient_checkpointing=false",
        f"train.compile={str(bool(spec['options'].get('compile'))).lower()}",
    ]


def _prepared(spec: dict[str, Any]) -> Any:
    """tunepilot's own data and model preparation: every engine starts from the same tokens
    and the same initial weights (LoRA's random A matrices included)."""
    from tunepilot.config import load_config
    from tunepilot.run import prepare

    return prepare(load_config(None, overrides=_overrides(spec, auto=False)))


def matmul_params(model: str) -> int:
    """Parameters used in matmuls per token (embedding lookups are free; a tied head is not)."""
    code = (
        "from tunepilot.model import load_model, resolve\n"
        f"m=load_model(resolve({model!r}))\n"
        "n=sum(p.numel() for k,p in m.named_parameters() if 'embed_tokens' not in k)\n"
        "print(n+m.get_output_embeddings().weight.numel()*bool(m.config.tie_word_embeddings))\n"
    )
    return int(subprocess.check_output([sys.executable, "-c", code], text=True).split()[-1])


def run_tunepilot(spec: dict[str, Any]) -> dict[str, Any]:
    from rich.console import Console

    from tunepilot.config import load_config
    from tunepilot.run import train

    out = Path(spec["work"]) / spec["key"]
    overrides = _overrides(spec, auto=bool(spec["options"].get("auto")))
    cfg = load_config(None, overrides=overrides, output_dir=str(out))
    train(cfg, Console(quiet=True), quiet=True)
    steps = [
        r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    plan = json.loads((out / "plan.json").read_text())["knobs"]
    timed = steps if WINDOW == "all" else steps[1:]
    seconds = steps[-1]["elapsed_s"] - (0.0 if WINDOW == "all" else steps[0]["elapsed_s"])
    real = sum(r["real_tokens"] for r in timed)
    processed = sum(r["real_tokens"] / (1 - r["padding_fraction"]) for r in timed)
    return {
        "tokens_per_s": real / seconds,
        "tokens_per_step": real / len(timed),
        "padding": 1 - real / processed,
        "peak_rss_gb": max(r["memory_gb"] for r in steps),  # ru_maxrss at each step's end
        "losses": [r["loss"] for r in steps],
        "same_order": True,
        "isolated": "yes (tested per sequence)" if plan["packing"]["value"] else "n/a (padded)",
        "choices": {k: plan[k]["value"] for k in ("precision", "micro_batch_size", "packing")},
    }


class _Counter:
    """Wraps a collator: real and processed tokens of every batch, in order."""

    def __init__(self, collate: Any) -> None:
        self.collate, self.batches = collate, []

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collate(features)
        ids = batch["input_ids"]
        # padding-free batches have no mask: one row, nothing padded
        real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else ids.numel()
        self.batches.append((real, ids.numel()))
        return batch


def _hf_args(spec: dict[str, Any], micro: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "output_dir": str(Path(spec["work"]) / spec["key"]),
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": GLOBAL_BATCH // micro,
        "max_steps": spec["steps"],
        "learning_rate": LR,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 1,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": spec.get("device", "cpu") == "cpu",
        "bf16": spec["precision"] == "bf16",
        "seed": SEED,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "gradient_checkpointing": bool(spec["options"].get("ckpt")),
        "torch_compile": bool(spec["options"].get("compile")),
        "remove_unused_columns": False,
    } | extra


def _ordered_rows(prep: Any, steps: int) -> list[Any]:
    """tunepilot's examples in tunepilot's order, step by step."""
    from tunepilot.data.batching import global_batch_at

    order: list[int] = []
    for position in range(steps):
        order += global_batch_at(position, len(prep.train), GLOBAL_BATCH, SEED)[1]
    return [prep.train[i] for i in order]


def _timing_callback(counter: _Counter, accumulation: int) -> tuple[Any, list[list[float]]]:
    from transformers import TrainerCallback

    ends: list[float] = []
    begin: list[float] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            from tunepilot.hardware import reset_peak_memory

            # training's own peak from here, as tunepilot logs it (the loaded model included)
            reset_peak_memory(device())
            begin.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            import torch

            if torch.cuda.is_available():  # the step's kernels, not just their launches
                torch.cuda.synchronize()
                ends.append(time.perf_counter())
                peak_rss.append(torch.cuda.max_memory_allocated() / 2**30)
                return
            ends.append(time.perf_counter())
            peak_rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)

    return Timer(), [begin, ends]


# GiB, at each Trainer step's end: the peak since training began, like tunepilot's (GPU
# memory on CUDA)
peak_rss: list[float] = []


def _hf_result(
    trainer: Any,
    counter: _Counter,
    clock: list[list[float]],
    spec: dict,
    acc: int,
    same_order: bool,
    isolated: str,
) -> dict[str, Any]:
    begin, ends = clock
    per_step = [counter.batches[i * acc : (i + 1) * acc] for i in range(len(ends))]
    timed_steps = per_step if WINDOW == "all" else per_step[1:]
    timed = [b for step in timed_steps for b in step]
    real = sum(r for r, _ in timed)
    processed = sum(p for _, p in timed)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "tokens_per_s": real / (ends[-1] - (begin[0] if WINDOW == "all" else ends[0])),
        "tokens_per_step": real / len(timed_steps),
        "padding": 1 - real / processed,
        "peak_rss_gb": peak_rss[-1],
        "losses": losses,
        "same_order": same_order,
        "isolated": isolated,
    }


def trainer_row(ex: Any) -> dict[str, list[int]]:
    """One tokenized example as the Trainer's dataset row: tokens, and labels that are -100
    where no loss is taken (the first token has none), truncated to MAX_LENGTH."""
    labels = [
        t if m and i > 0 else -100
        for i, (t, m) in enumerate(zip(ex.input_ids, ex.loss_mask, strict=True))
    ]
    return {"input_ids": ex.input_ids[:MAX_LENGTH], "labels": labels[:MAX_LENGTH]}


def run_trainer(spec: dict[str, Any]) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from tunepilot.run import load_trainable, resized_vocab

    prep = _prepared(spec)
    grouped = bool(spec["options"].get("group_by_length"))
    # group_by_length sorts within "megabatches" of up to 50 batches drawn from the whole set:
    # it needs the whole set (on only the steps' examples it would barely group at all)
    rows = prep.train if grouped else _ordered_rows(prep, spec["steps"])
    dataset = Dataset.from_list([trainer_row(ex) for ex in rows])
    # the layers as transformers and peft build them: the same weights as tunepilot's
    model = load_trainable(prep.cfg, prep.source, resized_vocab(prep), fast=False)
    counter = _Counter(
        DataCollatorForSeq2Seq(prep.tokenizer, padding=True, label_pad_token_id=-100)
    )
    # "sequential": tunepilot's order, already shuffled; group_by_length uses its own sampler
    sampler = "group_by_length" if grouped else "sequential"
    args = TrainingArguments(**_hf_args(spec, 8, {"train_sampling_strategy": sampler}))
    timer, clock = _timing_callback(counter, 1)
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=counter, callbacks=[timer]
    )
    trainer.train()
    return _hf_result(trainer, counter, clock, spec, 1, not grouped, "n/a (padded)")


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tunepilot.run import load_trainable, resized_vocab

    prep = _prepared(spec)
    options = spec["options"]
    packing = options.get("packing")
    # packing builds its rows from the whole set; padding_free keeps tunepilot's order
    rows = prep.train if packing else _ordered_rows(prep, spec["steps"])
    dataset = Dataset.from_list(
        [
            {
                "input_ids": ex.input_ids[:MAX_LENGTH],
                "completion_mask": [int(m) for m in ex.loss_mask[:MAX_LENGTH]],
            }
            for ex in rows
        ]
    )
    # the layers as transformers and peft build them: the same weights as tunepilot's
    model = load_trainable(prep.cfg, prep.source, resized_vocab(prep), fast=False)
    # packed rows hold ~MAX_LENGTH tokens (~6.5 examples here): one row per step keeps the
    # tokens per step close to the other engines' 8 examples
    micro = 1 if packing else 8
    extra = {
        # the rows are already truncated; TRL refuses max_length with padding_free alone
        "max_length": None if options.get("padding_free") else MAX_LENGTH,
        "train_sampling_strategy": "random" if packing else "sequential",
        "packing": bool(packing),
        "packing_strategy": packing or "bfd",
        "padding_free": bool(options.get("padding_free")),
        "completion_only_loss": True,
        "dataset_num_proc": None,
    }
    hf = _hf_args(spec, micro, extra)
    hf["gradient_accumulation_steps"] = 1 if packing else GLOBAL_BATCH // micro
    config = SFTConfig(**hf)
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=prep.tokenizer
    )
    counter = _Counter(trainer.data_collator)
    trainer.data_collator = counter
    isolated = _isolation(trainer, counter.collate)
    timer, clock = _timing_callback(counter, hf["gradient_accumulation_steps"])
    trainer.add_callback(timer)
    trainer.train()
    same_order = not packing  # padding_free keeps tunepilot's order and batches
    return _hf_result(
        trainer, counter, clock, spec, hf["gradient_accumulation_steps"], same_order, isolated
    )


def _isolation(trainer: Any, collate: Any) -> str:
    """Does the engine keep sequences that share a row apart? Each sequence's loss inside the
    engine's own batch (called as its trainer calls the model) vs the same sequence alone, and
    whether a label at a sequence start (predicted from the previous sequence) carries loss."""
    import torch
    import torch.nn.functional as F

    if not (trainer.padding_free or trainer.args.packing):
        return "n/a (padded)"
    if trainer.args.packing and trainer.args.packing_strategy == "wrapped":
        return "no: wrapped rows let examples attend across their boundaries"
    model = trainer.model.eval()
    batch = collate([trainer.train_dataset[i] for i in range(2)])
    batch = {k: v.to(model.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    labels = batch.pop("labels")
    ids, positions = batch["input_ids"], batch.get("position_ids")
    if positions is None:
        return "n/a (one sequence per row)"

    def token_losses(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = torch.zeros_like(target, dtype=torch.float32)
        keep = target != -100
        loss[keep] = F.cross_entropy(logits[keep].float(), target[keep], reduction="none")
        return loss

    with torch.no_grad():
        together = token_losses(model(**batch).logits[0, :-1], labels[0, 1:])
        starts = [i for i, p in enumerate(positions[0].tolist()) if p == 0] + [ids.shape[1]]
        worst, crossing = 0.0, False
        for s, e in itertools.pairwise(starts):
            alone = token_losses(model(input_ids=ids[:, s:e]).logits[0, :-1], labels[0, s + 1 : e])
            packed = together[s : e - 1]  # targets s+1 .. e-1
            worst = max(worst, float((packed.sum() - alone.sum()).abs() / alone.sum().clamp(1e-6)))
            crossing |= s > 0 and bool(labels[0, s] != -100)
    model.train()
    notes = []
    if worst > 1e-3:
        notes.append(f"loss differs by {worst:.0%} when packed")
    if crossing:
        notes.append("labels cross sequence starts")
    return "yes" if not notes else "no: " + "; ".join(notes)


if __name__ == "__main__":
    sys.exit(main())
