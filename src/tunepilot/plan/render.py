"""The plan as people read it: a table of knob, value, source and reason."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tunepilot.data.tokenize import Tokenized
from tunepilot.plan.plan import KNOB_ORDER, Plan
from tunepilot.plan.probe import TIMED_STEPS


def render_plan(plan: Plan, console: Console, sample: tuple[Tokenized, Any] | None = None) -> None:
    m, d, hw = plan.model, plan.data, plan.hardware
    console.print(
        f"[bold]model[/] {m['name']} ({m['method']}): {m['total_parameters']:,} "
        f"parameters, {m['trainable_parameters']:,} trainable"
    )
    console.print(
        f"[bold]hardware[/] {hw.device} {hw.name}, {hw.memory_available_gb:.1f} of "
        f"{hw.memory_total_gb:.1f} GB free, bf16: {'yes' if hw.bf16 else 'no'} "
        f"({hw.bf16_reason})"
        + (f"; fp32 matmuls: {hw.fp32_matmul_reason}" if hw.fp32_matmul_reason else ""),
        highlight=False,
    )
    if hw.processes > 1:
        how = "DDP" if m["method"] == "lora" else "FSDP2"
        console.print(
            f"[bold]distributed[/] {hw.processes} processes ({how}), each with 1/{hw.processes} "
            "of every global batch; memory and cores above are per process",
            highlight=False,
        )
    pct = d["length_percentiles"]
    console.print(
        f"[bold]data[/] {d['format']}: {d['train_examples']} train / "
        f"{d['eval_examples']} eval examples"
        + (
            f" (a seeded sample of {d['eval_available']:,}: data.eval_max_examples)"
            if "eval_available" in d
            else ""
        )
        + f", {d['supervised_tokens']:,} supervised "
        f"tokens; length p50 {pct['p50']}, p99 {pct['p99']}, max {pct['max']}; "
        f"truncated {d['truncated_examples']} examples ({d['truncated_tokens']} tokens)",
        highlight=False,
    )
    table = Table(title="plan", show_lines=False, expand=False)
    for column in ("knob", "value", "source", "reason"):
        table.add_column(column, overflow="fold")
    for name in KNOB_ORDER:
        if name in plan.knobs:
            k = plan.knobs[name]
            table.add_row(name, str(k.value), k.source, k.reason)
    console.print(table)
    mem, probe = plan.memory, plan.probe
    budget = f"budget {mem['budget_gb']:.1f} GB"
    if "measured_peak_gb" not in probe:
        line = f"memory: predicted peak {mem['total_gb']:.1f} GB ({budget})"
    else:
        peak, resting = probe["measured_peak_gb"], probe.get("resting_gb", 0.0)
        error = f"memory model error {probe['memory_model_error']:+.0%}"
        # two decimals: the three figures below must add up as printed
        line = (
            f"memory: training predicted {mem['total_gb']:.2f} GB, measured "
            f"{peak - resting:.2f} GB ({error})"
        )
        # on a CPU the probe reads the whole process; the memory model counts training state
        if resting:
            line += (
                f" on top of the {resting:.2f} GB the process held before loading the model: "
                f"peak {peak:.2f} GB"
            )
        line += f", {budget}"
    console.print(line, highlight=False)
    if "step_seconds" in probe:
        total = probe["step_seconds"] * plan["total_steps"]
        # a fast GPU finishes a small job in seconds: "~0 min" would say nothing
        duration = f"{total:.0f} s" if total < 90 else f"{total / 60:.0f} min"
        source = "cached probe" if probe.get("cached") else f"probe took {probe['seconds']:.0f} s"
        console.print(
            f"time: ~{probe['step_seconds']:.1f} s per step at "
            f"{probe['tokens_per_s']:.0f} tokens/s (worst-case length), ~"
            f"{duration} for {plan['total_steps']} steps ({source})",
            highlight=False,
        )
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if sample is not None:
        audit_line(*sample, console, plan["max_length"])


def audit_line(example: Tokenized, tokenizer: Any, console: Console, max_length: int) -> None:
    """One line of the label audit: how much of an example is trained, and where it starts."""
    mask = example.loss_mask[:max_length]
    first = next((i for i, m in enumerate(mask) if m), None)
    start = ""
    if first is not None:  # the first trained run only: untrained tokens after it would mislead
        end = next((i for i in range(first, len(mask)) if not mask[i]), len(mask))
        start = tokenizer.decode(example.input_ids[first : min(end, first + 12)])
    console.print(
        f"[bold]label audit[/] {example.where}: {sum(mask)} of {len(mask)} tokens "
        f"carry loss, first trained tokens {start!r} (see plan --show-sample N)",
        highlight=False,
    )


def render_sample(example: Tokenized, tokenizer: Any, console: Console, max_length: int) -> None:
    """The label audit: the example as the model sees it; trained tokens green and underlined.

    Plain output (no colour) marks trained spans with [[ ]] instead.
    """
    ids, mask = example.input_ids[:max_length], example.loss_mask[:max_length]
    text = Text()
    plain = []
    for i, (tok, trained) in enumerate(zip(ids, mask, strict=True)):
        piece = tokenizer.decode([tok])
        text.append(piece, style="bold green underline" if trained else "dim")
        opens = trained and (i == 0 or not mask[i - 1])
        closes = trained and (i == len(mask) - 1 or not mask[i + 1])
        plain.append(("[[" if opens else "") + piece + ("]]" if closes else ""))
    n = sum(mask)
    console.print(
        f"[bold]label audit[/] {example.where}: {n} of {len(ids)} tokens carry loss "
        + ("(green)" if console.is_terminal else "(inside [[ ]])"),
        highlight=False,
    )
    if console.is_terminal:
        console.print(text)
    else:
        console.print("".join(plain), markup=False, highlight=False)


def render_explain(plan: Plan, console: Console) -> None:
    """The long form: every reason unabridged, and every probe measurement."""
    console.print("\n[bold]decisions[/]")
    for name in KNOB_ORDER:
        if name in plan.knobs:
            k = plan.knobs[name]
            console.print(f"- {name} = {k.value} ({k.source}): {k.reason}", highlight=False)
    points = plan.probe.get("points", [])
    if points:
        table = Table(
            title="probe measurements (real training steps: each the fastest of "
            f"{TIMED_STEPS} timed after one to warm up)"
        )
        for column in (
            "micro-batch",
            "length",
            "precision",
            "checkpointing",
            "fits",
            "tokens/s",
            "peak GB",
            "loss",
            "note",
        ):
            table.add_column(column)
        for p in points:
            table.add_row(
                str(p["micro_batch"]),
                str(p["max_length"]),
                p["precision"],
                str(p["checkpointing"]),
                "yes" if p["fits"] else "no",
                f"{p['tokens_per_s']:.0f}",
                f"{p['peak_gb']:.2f}",
                f"{p['loss']:.4f}",
                p["note"],
            )
        console.print(table)
