"""``tunepilot sweep``: an Optuna study whose trials are short tunepilot runs.

The flow: open the storage (fail fast on a bad URL) -> plan the base config once (the probe and
tokenization run once, and every trial gets the same resolved batch, length, precision, steps,
seed and data) -> create or load the study -> claim a trial, run it, repeat until the study
holds ``--trials`` trials -> write the outputs.

``--trials N`` is the study's total, not this process's share: trials that are complete, pruned,
running (in this or another worker) or waiting count; failed ones do not (their place goes to a
new trial). Re-running the same command continues the study up to N; several workers started
with the same storage and study split the N trials between them.
"""

from __future__ import annotations

import gc
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.distributions import BaseDistribution
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from sqlalchemy.engine import URL

from tunepilot.config import Config
from tunepilot.errors import Interrupted, RunError, UserError
from tunepilot.plan.render import render_plan
from tunepilot.run import make_run_dir, prepare, resolved_config
from tunepilot.sweep import DEFAULT_PRUNER, DEFAULT_STUDY, PRUNERS, outputs, storage
from tunepilot.sweep.space import search_space, space_from_json, space_to_json
from tunepilot.sweep.trial import finish, run_trial

BOUND_FILE = "sweep.json"  # which study an output dir belongs to
PRUNE_AFTER_TRIALS = 3  # the median of fewer finished trials is noise
RANDOM_TRIALS = 5  # TPE samples at random until this many trials have finished
FAILURES_IN_A_ROW = 3  # after this many, something systematic is wrong: stop
POLL_S = 2  # how often a worker with nothing left to claim looks at the running trials
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
SPACE_ATTR, CONFIG_ATTR = "tunepilot_space", "tunepilot_config"


@dataclass
class SweepRequest:
    """What ``tunepilot sweep`` is asked for, besides the config (its flags)."""

    trials: int
    storage: str | None = None
    study: str = DEFAULT_STUDY
    pruner: str = DEFAULT_PRUNER


def run_sweep(cfg: Config, request: SweepRequest, console: Console) -> Path:
    """Run (or continue) the study, then write its outputs; returns the output dir."""
    if request.trials < 1:
        raise UserError(f"--trials {request.trials}: must be at least 1")
    if request.pruner not in PRUNERS:
        raise UserError(f"--pruner {request.pruner}: must be one of {', '.join(PRUNERS)}")
    out_dir = make_run_dir(
        Path(cfg.output_dir or Path("runs") / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    )
    url = storage.parse(request.storage or storage.default_url(out_dir))
    bind_output_dir(out_dir, request)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # we print our own line per trial
    warnings.filterwarnings("ignore", category=ExperimentalWarning)
    rdb = storage.open_storage(url)
    console.print("planning the base config every trial shares...", highlight=False)
    prep = prepare(cfg, console)
    render_plan(prep.plan, console)
    base, plan = absolute_paths(resolved_config(cfg, prep.plan)), prep.plan
    del prep
    free_memory()  # the probe's model
    with storage.exclusive(url, request.study):
        study = optuna.create_study(
            storage=rdb,
            study_name=request.study,
            direction="minimize",
            sampler=optuna.samplers.TPESampler(n_startup_trials=RANDOM_TRIALS, constant_liar=True),
            pruner=make_pruner(request.pruner, plan["eval_every"], plan["total_steps"]),
            load_if_exists=True,
        )
        space = study_space(study, cfg, plan["learning_rate"])
    title = f"study {request.study} ({storage.shown(url)}), {request.trials} trials"
    console.print(outputs.space_table(space, title))
    console.print(f"pruning: {pruning_note(request.pruner, plan['eval_every'])}", highlight=False)
    outputs.write_atomic(
        out_dir / BOUND_FILE, json.dumps(describe(request, cfg, space), indent=2) + "\n"
    )
    ran = work(
        study,
        url,
        request.trials,
        lambda trial: run_trial(trial, space, base, out_dir, console),
        console,
    )
    summarize(study, cfg, space, out_dir, console, ran)
    return out_dir


def make_pruner(name: str, eval_every: int, total_steps: int) -> optuna.pruners.BasePruner:
    """Judge trials on their periodic eval losses (steps are optimizer steps)."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=PRUNE_AFTER_TRIALS)
    if name == "hyperband":
        first = eval_every or total_steps
        return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=total_steps)
    return optuna.pruners.NopPruner()


def study_space(study: optuna.Study, cfg: Config, planned_lr: float) -> dict[str, BaseDistribution]:
    """The study's search space: stored by its first worker, so every worker and every re-run
    searches the same ranges; a different config than the study's is refused."""
    mine = fingerprint(cfg)
    attrs = study.user_attrs
    foreign = study.direction != optuna.study.StudyDirection.MINIMIZE or (
        CONFIG_ATTR not in attrs and study.get_trials(deepcopy=False)
    )
    if foreign:
        raise UserError(
            f"--study {study.study_name}: a study that tunepilot sweep did not start; "
            "pass another --study"
        )
    if CONFIG_ATTR not in attrs:
        space = search_space(cfg.method, planned_lr)
        study.set_user_attr(SPACE_ATTR, space_to_json(space))
        study.set_user_attr(CONFIG_ATTR, mine)
        return space
    differ = sorted(
        k
        for k in mine.keys() | attrs[CONFIG_ATTR].keys()
        if mine.get(k) != attrs[CONFIG_ATTR].get(k)
    )
    if differ:
        raise UserError(
            f"--study {study.study_name}: started with a different config "
            f"({', '.join(differ[:4])}{', ...' if len(differ) > 4 else ''} differ); "
            "continue it with the same config, or pass a new --study"
        )
    return space_from_json(attrs[SPACE_ATTR])


def fingerprint(cfg: Config) -> dict[str, Any]:
    """What must agree between the workers and re-runs of one study, flattened to dotted keys:
    the config minus where outputs go, with file paths reduced to their names (each machine may
    hold the data and model in another place)."""
    data = cfg.to_dict()
    data.pop("output_dir")
    for section, key in (("data", "train"), ("data", "eval"), (None, "model")):
        holder = data[section] if section else data
        if holder[key] is not None:
            holder[key] = Path(holder[key]).name
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def absolute_paths(config: dict[str, Any]) -> dict[str, Any]:
    """Data and model paths made absolute: a config written into the output dir (a trial's
    config.yaml, best.yaml) would otherwise resolve them relative to itself."""
    data = config["data"]
    for key in ("train", "eval"):
        if data.get(key) is not None:
            data[key] = str(Path(data[key]).expanduser().resolve())
    if Path(config["model"]).expanduser().exists():  # a local model, not an alias or hub id
        config["model"] = str(Path(config["model"]).expanduser().resolve())
    return config


def work(
    study: optuna.Study,
    url: URL,
    budget: int,
    objective: Callable[[optuna.Trial], float],
    console: Console,
) -> list[FrozenTrial]:
    """Claim and run trials until the study holds ``budget`` counted trials and none is still
    running anywhere (so every worker ends with the whole study, and a dead worker's trial is
    replaced); returns the trials this process ran."""
    ran: list[FrozenTrial] = []
    failures = 0
    waited = False
    while True:
        running = claim(study, url, budget)
        if running is None:
            ran.append(run_one(study, objective, console))
            failures = failures + 1 if ran[-1].state == TrialState.FAIL else 0
            if failures >= FAILURES_IN_A_ROW:
                raise RunError(
                    f"{failures} trials in a row failed, the last ({ran[-1].number}) with: "
                    f"{ran[-1].user_attrs.get('error', 'an error')}; see train.log in "
                    f"{ran[-1].user_attrs.get('run_dir', 'its trial directory')}"
                )
            continue
        if not running:
            return ran
        if not waited:
            console.print(
                f"waiting for trial(s) {', '.join(map(str, running))}: running in another "
                f"worker, or in a dead one (replaced after {storage.GRACE_S} s without a "
                "heartbeat)",
                highlight=False,
            )
            waited = True
        time.sleep(POLL_S)


def claim(study: optuna.Study, url: URL, budget: int) -> list[int] | None:
    """Add a trial for this worker if the study is under budget (None); else the numbers of
    the trials still running."""
    with storage.exclusive(url, study.study_name):
        # a dead worker's RUNNING trial (no heartbeat for the grace period) fails here and
        # stops counting, so its place goes to a new trial
        optuna.storages.fail_stale_trials(study)
        counted = study.get_trials(deepcopy=False, states=COUNTED)
        if len(counted) >= budget:
            return [t.number for t in counted if t.state == TrialState.RUNNING]
        # a WAITING trial added under the lock, so exactly the budget is ever created;
        # optimize() then takes the oldest waiting trial (this one or an equivalent)
        # atomically. A worker that dies between the two leaves one waiting: a later claim
        # runs it, or, at the last slot, the study ends one short (the summary shows it)
        study.enqueue_trial({})
        return None


def run_one(
    study: optuna.Study, objective: Callable[[optuna.Trial], float], console: Console
) -> FrozenTrial:
    started: list[int] = []
    try:
        study.optimize(partial(_tracked, objective, started), n_trials=1, catch=(RunError,))
    except Interrupted as exc:
        raise Interrupted(
            "sweep stopped by a signal; the trial in progress is marked failed. Run the "
            "same command again to continue the study",
            exc.exit_code,
        ) from None
    finally:
        free_memory()
        trials = study.get_trials(deepcopy=False)
        for n in started:
            finish(trials[n])
            console.print(outputs.outcome(trials[n]), highlight=False)
    return trials[started[0]]


def _tracked(
    objective: Callable[[optuna.Trial], float], started: list[int], trial: optuna.Trial
) -> float:
    started.append(trial.number)  # so the trial is tidied up even when it raises
    return objective(trial)


def free_memory() -> None:
    """Release the last trial's model, optimizer and activations before the next one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def summarize(
    study: optuna.Study,
    cfg: Config,
    space: dict[str, BaseDistribution],
    out_dir: Path,
    console: Console,
    ran: list[FrozenTrial],
) -> None:
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    console.print(outputs.results_table(study, list(space)))
    console.print(
        f"{len(trials)} trials in study {study.study_name} ({len(ran)} run by this process): "
        + ", ".join(f"{states.count(s)} {s.name.lower()}" for s in TrialState if s in states),
        highlight=False,
    )
    running = states.count(TrialState.RUNNING)
    if running:
        console.print(
            f"{running} trial(s) still running: in another worker, or in one that died (after "
            f"{storage.GRACE_S} s without a heartbeat, a re-run replaces it)",
            highlight=False,
        )
    csv = outputs.write_csv(study, out_dir)
    plots, left_out = outputs.write_plots(study, out_dir)
    best = outputs.write_best(study, absolute_paths(cfg.to_dict()), out_dir)
    if best is None:
        console.print("no trial completed: no best.yaml", highlight=False)
    else:
        path, trial = best
        console.print(
            f"best: trial {trial.number}, eval loss {trial.value:.4f} "
            f"({outputs.format_params(trial.params)})\n  {path}: tunepilot train {path}",
            highlight=False,
        )
    console.print(f"outputs in {out_dir}/", highlight=False)
    console.print(f"  {csv.name}, {BOUND_FILE}, trials/ (one run dir each)", highlight=False)
    for path in plots:
        console.print(f"  plots/{path.name}", highlight=False)
    for note in left_out:
        console.print(f"  no {note}", highlight=False)


def bind_output_dir(out_dir: Path, request: SweepRequest) -> None:
    """An output dir holds one study's trials (their directories are named by trial number)."""
    path = out_dir / BOUND_FILE
    if not path.is_file():
        return
    bound = json.loads(path.read_text())
    if bound.get("study") != request.study:
        raise UserError(
            f"--study {request.study}: {out_dir} holds study {bound.get('study')!r} (see "
            f"{path}); pass --study with that name to continue it, or another --output-dir"
        )
    where = _storage_label(request)
    if bound.get("storage") != where:
        raise UserError(
            f"--storage {where}: {out_dir} holds a study stored in {bound.get('storage')}; "
            "pass that --storage to continue it, or another --output-dir"
        )


def _storage_label(request: SweepRequest) -> str:
    # the default is named rather than given as its path, so the output dir can be moved
    if request.storage is None:
        return f"default ({storage.DEFAULT_FILE} in the output dir)"
    return storage.shown(storage.parse(request.storage))


def describe(
    request: SweepRequest, cfg: Config, space: dict[str, BaseDistribution]
) -> dict[str, Any]:
    """sweep.json: which study the output dir belongs to, and what it searches."""
    return {
        "study": request.study,
        "storage": _storage_label(request),
        "method": cfg.method,
        "space": {name: outputs.describe_distribution(d) for name, d in space.items()},
    }


def pruning_note(pruner: str, eval_every: int) -> str:
    if pruner == "none":
        return "off"
    if not eval_every:
        return "off (no evaluation before the end of a trial: set train.eval_every)"
    after = f", once {PRUNE_AFTER_TRIALS} trials have finished" if pruner == "median" else ""
    return f"{pruner}, on the eval loss every {eval_every} steps{after}"
