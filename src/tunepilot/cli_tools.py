"""Subcommands that work on a finished run or a model: report, runs, eval, chat, export.

Kept apart from ``cli.py`` (train and plan) so both can grow independently; ``cli.py`` adds
these parsers and hands matching commands to ``dispatch``. Same contract: parse, call, print;
``UserError`` -> exit 2, ``RunError`` -> exit 3 (raised here, reported by ``cli.main``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tunepilot.errors import UserError

COMMANDS = ("report", "runs", "eval", "chat", "export")
TARGET_HELP = "a run directory (its model/ is used), model directory, .gguf file or bundled alias"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the commands on ``tunepilot``'s subparsers."""
    r = sub.add_parser("report", help="rebuild RUN_DIR/report.html (plots, plan, evaluation)")
    r.add_argument("run_dir", metavar="RUN_DIR")
    ru = sub.add_parser("runs", help="list runs with their key figures")
    ru.add_argument("root", nargs="?", default="runs", metavar="DIR", help="default: runs")
    e = sub.add_parser("eval", help="loss, perplexity and exact match on a data file")
    e.add_argument("target", metavar="RUN_DIR|MODEL", help=TARGET_HELP)
    e.add_argument("--data", required=True, metavar="FILE", help="JSONL/JSON/CSV/Parquet file")
    e.add_argument(
        "--format",
        default="auto",
        choices=("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"),
        help="data format (default: detected from the columns)",
    )
    e.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="rows per batch, loss and generation (default: 8 for the loss; generation as wide "
        "as memory allows, up to 128)",
    )
    e.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        help="generation budget (default: longest reference answer + 8)",
    )
    e.add_argument(
        "--scorer",
        metavar="MODULE:FUNCTION",
        help="score answers with FUNCTION(expected, generated) -> bool or 0..1 instead of "
        "exact match",
    )
    e.add_argument("--samples", type=int, default=3, metavar="N", help="answers to show (3)")
    c = sub.add_parser("chat", help="chat with a model (streams tokens; /exit or Ctrl-D quits)")
    c.add_argument("target", metavar="RUN_DIR|MODEL", help=TARGET_HELP)
    c.add_argument("--prompt", help="answer this one message and exit")
    c.add_argument("--system", help="system message")
    c.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="default 256")
    c.add_argument(
        "--temperature", type=float, default=0.0, help="0 (default) is greedy; > 0 samples"
    )
    x = sub.add_parser("export", help="export a run's model (verified by reloading it)")
    x.add_argument("run_dir", metavar="RUN_DIR")
    x.add_argument("--format", required=True, choices=("hf", "adapter", "gguf"))
    x.add_argument("--out", metavar="DIR", help="new or empty folder (default RUN_DIR/export/FMT)")


def dispatch(args: argparse.Namespace, console: Console) -> int:
    handler = {
        "report": _report,
        "runs": _runs,
        "eval": _eval,
        "chat": _chat,
        "export": _export,
    }[args.command]
    return handler(args, console)


def _report(args: argparse.Namespace, console: Console) -> int:
    from tunepilot.report import build_report

    path = build_report(Path(args.run_dir))
    print(path)
    return 0


def _runs(args: argparse.Namespace, console: Console) -> int:
    from tunepilot.report import fmt, list_runs, pct

    damaged: list[str] = []
    runs = list_runs(Path(args.root), damaged)
    for problem in damaged:
        console.print(f"[yellow]warning:[/] skipped {problem}", highlight=False)
    if not runs:
        hint = "" if damaged else " (a run directory holds plan.json)"
        console.print(f"no readable runs under {args.root}{hint}", highlight=False)
        return 0
    table = Table(title=f"runs in {args.root}")
    for column in ("run", "date", "model", "method", "steps", "final loss"):
        table.add_column(column, overflow="fold")
    for column in ("eval loss before → after", "exact match before → after", "tok/s"):
        table.add_column(column, justify="right")
    for r in runs:
        rate = r["tokens_per_s"]
        table.add_row(
            r["name"] + ("" if r["finished"] else " (unfinished)"),
            r["date"],
            Path(str(r["model"])).name,  # a model directory's path would fill the table
            str(r["method"]),
            fmt(r["steps"]),
            fmt(r["final_loss"]),
            f"{fmt(r['eval_loss_before'])} → {fmt(r['eval_loss_after'])}",
            f"{pct(r['exact_match_before'])} → {pct(r['exact_match_after'])}",
            f"{rate:.0f}" if rate else "—",
        )
    console.print(table)
    return 0


def _eval(args: argparse.Namespace, console: Console) -> int:
    from tunepilot.eval_file import evaluate_file
    from tunepilot.scoring import load_scorer

    scorer = load_scorer(args.scorer) if args.scorer else None
    console.print(f"evaluating {args.target} on {args.data}...", highlight=False)
    result = evaluate_file(
        args.target,
        args.data,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        scorer=scorer,
        data_format=args.format,
        n_samples=max(args.samples, 0),
    )
    console.print(
        f"{result.examples} examples ({result.data_format}), {result.supervised_tokens:,} "
        f"scored tokens, {result.device} {result.precision}, {result.seconds:.1f}s",
        highlight=False,
    )
    if result.truncated_examples:
        console.print(
            f"warning: {result.truncated_examples} examples exceed the model's context and "
            "were scored on their beginning only",
            highlight=False,
        )
    console.print(f"loss {result.loss:.4f}", highlight=False)
    console.print(f"perplexity {result.perplexity:.3f}", highlight=False)
    em = result.exact
    if em is None:
        console.print("exact match: no reference answers (text data)", highlight=False)
        return 0
    label = f"score ({args.scorer})" if args.scorer else "exact match"
    correct = f"{em.correct:g}" if isinstance(em.correct, float) else str(em.correct)
    console.print(f"{label} {correct}/{em.total} ({em.accuracy:.1%})", highlight=False)
    _print_samples(em.samples[: args.samples], console)
    return 0


def _print_samples(samples: list[dict], console: Console) -> None:
    if not samples:
        return
    table = Table(show_lines=True)
    for column in ("where", "expected", "generated", "ok"):
        table.add_column(column, overflow="fold")
    for s in samples:
        mark = f"{s['score']:.2f}" if "score" in s else ("yes" if s["correct"] else "no")
        table.add_row(s["where"], s["expected"], s["generated"], mark)
    console.print(table)


def _chat(args: argparse.Namespace, console: Console) -> int:
    from tunepilot.chat import one_shot, repl
    from tunepilot.inference import load_for_inference

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    loaded = load_for_inference(args.target)
    system = args.system if args.system is not None else _trained_system(args.target)
    if args.prompt is not None:
        one_shot(loaded, args.prompt, args.max_new_tokens, args.temperature, system)
        return 0
    repl(
        loaded,
        args.max_new_tokens,
        args.temperature,
        system,
        sys.stdin,
        sys.stdout,
        sys.stderr,
    )
    return 0


def _trained_system(target: str) -> str | None:
    """A run's model answers as trained only under the system message its training data all
    carried (the demo's, without it, answers a booking with 'A: Ana Li' instead of its JSON)."""
    from tunepilot.rundir import is_run_dir, read_plan

    path = Path(target).expanduser()
    if not (path.is_dir() and is_run_dir(path)):
        return None
    system = read_plan(path).get("data", {}).get("system_prompt")
    if system:
        shown = system if len(system) <= 80 else system[:77] + "..."
        # stderr, as the chat's own banner: a --prompt reply on stdout stays the reply alone
        sys.stderr.write(
            f"system message from the run's training data: {shown!r} (--system '' for none)\n"
        )
    return system or None


def _export(args: argparse.Namespace, console: Console) -> int:
    from tunepilot.export_formats import export_run
    from tunepilot.verify import require

    out = Path(args.out) if args.out else None
    console.print(f"exporting {args.run_dir} as {args.format}...", highlight=False)
    result = export_run(Path(args.run_dir), args.format, out)
    for check in result.checks:
        console.print(check.line(), highlight=False)
    for note in result.notes:
        console.print(note, highlight=False)
    require(result.checks, result.path)  # RunError (exit 3) naming the failed check
    console.print(f"wrote {result.path}", highlight=False)
    return 0
