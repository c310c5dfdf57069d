"""The command line: parse, call, print. No logic lives here.

Exit codes: 0 success, 2 bad user input (``error:`` lines on stderr), 3 a run that could not go
on (diagnosis on stderr), 130 interrupted.

Under torchrun every rank runs this; only rank 0 prints, apart from run errors (which may be a
single rank's own, e.g. its device ran out of memory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from rich.console import Console

from tunepilot import __version__, cli_tools, sweep
from tunepilot.errors import Interrupted, RunError, Terminated, UserError
from tunepilot.train.allocator import relaunch_with_tcmalloc


def _common(
    p: argparse.ArgumentParser, output_dir: str = "run directory (default runs/<time>)"
) -> None:
    p.add_argument("config", nargs="?", help="YAML config (default: the bundled demo recipe)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.max_steps=50 (repeatable)",
    )
    p.add_argument("--output-dir", help=output_dir)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tunepilot",
        description="Fine-tune LLMs with hyperparameters that set themselves, and say why.",
    )
    p.add_argument("--version", action="version", version=f"tunepilot {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="plan and run a fine-tune")
    _common(t)
    t.add_argument("--quiet", action="store_true", help="log lines instead of a progress bar")
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output-dir from its last checkpoint (re-running "
        "the same command on the same output dir does this too)",
    )
    t.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train with N processes on this machine (one per GPU): runs torchrun "
        "--nproc-per-node N -m tunepilot train with the other arguments",
    )
    pl = sub.add_parser("plan", help="print the resolved plan without training")
    _common(pl)
    pl.add_argument("--json", action="store_true", help="print plan.json to stdout")
    pl.add_argument(
        "--explain",
        action="store_true",
        help="print every reason in full and every probe measurement",
    )
    pl.add_argument(
        "--show-sample",
        type=int,
        metavar="N",
        help="show training example N with the tokens that carry loss marked",
    )
    lf = sub.add_parser("lr-find", help="LR range test + held-out mini-sweep; plot and JSON")
    _common(lf)
    sw = sub.add_parser(
        "sweep", help="Optuna study over the knobs worth searching; best.yaml for train"
    )
    _common(sw, output_dir="sweep directory: trials, plots, best.yaml (default runs/sweep-<time>)")
    sw.add_argument(
        "--trials",
        type=int,
        required=True,
        metavar="N",
        help="trials the study should hold in total (re-running continues up to N; "
        "workers sharing a study split them)",
    )
    sw.add_argument(
        "--storage",
        metavar="URL",
        help="SQLAlchemy URL of the study's database (default: sqlite file sweep.db in the "
        "output dir); e.g. postgresql://user:pass@host/db lets several workers share a study",
    )
    sw.add_argument(
        "--study", default=sweep.DEFAULT_STUDY, metavar="NAME", help="study name (default sweep)"
    )
    sw.add_argument(
        "--pruner",
        default=sweep.DEFAULT_PRUNER,
        choices=sweep.PRUNERS,
        help="stop hopeless trials early on their periodic eval losses (default median)",
    )
    cli_tools.add_parsers(sub)  # report, runs, eval, chat, export
    return p


def _quiet_libraries() -> None:
    """Our own progress and messages say what matters; library bars and deprecation chatter
    (about APIs we call correctly for the pinned versions) would bury them."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient checkpointing.*")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _console(stderr: bool = False) -> Console:
    # piped output (CI, logs) gets a readable width instead of rich's 80-column fallback
    probe = Console(stderr=stderr)
    width = None if probe.is_terminal else 120
    return Console(stderr=stderr, highlight=False, width=width)


# the commands that train or measure training; they restart with tcmalloc when it is installed
TRAINING_COMMANDS = ("train", "plan", "lr-find", "sweep")


def _user_error(exc: UserError) -> int:
    """One ``error:`` line per problem (``str(exc)`` would put the second on a bare line)."""
    for problem in exc.problems:
        print(f"error: {problem}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    own_start = argv is None  # the process's own command line: it may restart itself
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if own_start and args.command in TRAINING_COMMANDS:
        try:
            relaunch_with_tcmalloc()  # returns only where there is nothing to do
        except UserError as exc:
            return _user_error(exc)
    rank = 0  # this process's rank under torchrun
    if args.command == "train":
        from tunepilot import distributed  # imports torch, which training needs anyway

        if args.nproc is not None:
            try:
                if args.nproc < 1:
                    raise UserError(f"--nproc {args.nproc}: need at least 1 process")
                return distributed.launch(args.nproc, without_nproc(argv))
            except UserError as exc:
                return _user_error(exc)
        rank = distributed.rank()
    _quiet_libraries()
    main_rank = rank == 0
    err = _console(stderr=True)
    # JSON on stdout must stay clean: everything human goes to stderr in that mode
    out = err if getattr(args, "json", False) else _console()
    if not main_rank:
        out = Console(quiet=True)
    from tunepilot.train.signals import sigterm_stops

    try:
        with sigterm_stops():
            return _dispatch(args, out)
    except UserError as exc:
        return _user_error(exc) if main_rank else 2  # every rank has the same problem
    except RunError as exc:
        where = "" if main_rank else f"rank {rank}: "
        print(f"error: {where}{exc}", file=sys.stderr)
        return 3
    except Interrupted as exc:
        if main_rank:
            print(f"stopped: {exc}", file=sys.stderr)
        return exc.exit_code
    except Terminated:
        print("error: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, ours or a library's: not something the user typed
        if os.environ.get("TUNEPILOT_TRACEBACK"):
            raise
        where = "" if main_rank else f"rank {rank}: "
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(
            f"error: {where}internal error, {type(exc).__name__}: {first}; the traceback is "
            f"in {_save_traceback(exc)} (please report it; TUNEPILOT_TRACEBACK=1 prints it here)",
            file=sys.stderr,
        )
        return 1


def _save_traceback(exc: BaseException) -> Path:
    import tempfile
    import traceback

    with tempfile.NamedTemporaryFile(
        "w", prefix="tunepilot-traceback-", suffix=".txt", delete=False
    ) as f:
        f.write("".join(traceback.format_exception(exc)))
    return Path(f.name)


def _dispatch(args: argparse.Namespace, console: Console) -> int:
    if args.command in cli_tools.COMMANDS:
        return cli_tools.dispatch(args, console)
    from tunepilot.config import load_config

    cfg = load_config(args.config, args.overrides, args.output_dir)
    if args.command == "lr-find":
        from tunepilot.run import lr_find

        lr_find(cfg, console)
        return 0
    if args.command == "sweep":
        from tunepilot import distributed
        from tunepilot.sweep.study import SweepRequest, run_sweep

        if distributed.launched():  # every rank would run the whole study
            raise UserError(
                "sweep: trials are single-process runs; start several sweep workers on one "
                "--storage instead of launching the sweep with torchrun"
            )

        run_sweep(cfg, SweepRequest(args.trials, args.storage, args.study, args.pruner), console)
        return 0
    if args.command == "train":
        from tunepilot import distributed
        from tunepilot.run import train

        with distributed.process_group():  # under torchrun; nothing when run alone
            train(cfg, console, quiet=args.quiet or bool(os.environ.get("CI")), resume=args.resume)
        return 0
    from tunepilot.plan.render import render_explain, render_plan, render_sample
    from tunepilot.run import prepare

    prep = prepare(cfg, console)
    if args.json:
        print(json.dumps(prep.plan.to_dict(), indent=2))
        return 0
    render_plan(prep.plan, console, sample=(prep.train[0], prep.tokenizer))
    if args.explain:
        render_explain(prep.plan, console)
    if args.show_sample is not None:
        n = args.show_sample
        if not 0 <= n < len(prep.train):
            raise UserError(
                f"--show-sample {n}: there are {len(prep.train)} training examples "
                f"(0..{len(prep.train) - 1})"
            )
        render_sample(prep.train[n], prep.tokenizer, console, prep.plan["max_length"])
    return 0


def without_nproc(argv: list[str]) -> list[str]:
    """The command line minus ``--nproc N`` (what each torchrun worker runs)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(main())
