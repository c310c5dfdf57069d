"""What a sweep shows and leaves behind: the tables, results.csv, plots and best.yaml.

Several workers may share an output dir and finish at the same moment, so every file is written
to a temporary name and renamed into place: a reader sees the old file or the new one, never half.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState
from rich.table import Table

from tunepilot.config import dump_yaml
from tunepilot.sweep.space import apply_params

PLOTS = {
    "optimization_history": "plot_optimization_history",
    "param_importances": "plot_param_importances",
    "intermediate_values": "plot_intermediate_values",
}


def space_table(space: dict[str, BaseDistribution], title: str) -> Table:
    table = Table(title=title)
    table.add_column("knob")
    table.add_column("searched over")
    for name, dist in space.items():
        table.add_row(name, describe_distribution(dist))
    return table


def describe_distribution(dist: BaseDistribution) -> str:
    if isinstance(dist, CategoricalDistribution):
        return ", ".join(str(c) for c in dist.choices)
    assert isinstance(dist, FloatDistribution)
    return f"{dist.low:g} .. {dist.high:g}" + (" (log)" if dist.log else "")


def outcome(t: FrozenTrial) -> str:
    """One line per finished trial, as the sweep goes."""
    took = f" ({t.duration.total_seconds():.0f} s)" if t.duration else ""
    if t.state == TrialState.COMPLETE:
        return f"trial {t.number}: eval loss {t.value:.4f}{took}"
    if t.state == TrialState.PRUNED and t.intermediate_values:
        step = max(t.intermediate_values)
        return (
            f"trial {t.number}: pruned at step {step}, eval loss "
            f"{t.intermediate_values[step]:.4f}{took}"
        )
    error = t.user_attrs.get("error")
    state = "failed" if t.state == TrialState.FAIL else t.state.name.lower()
    return f"trial {t.number}: {state}{took}" + (f": {error}" if error else "")


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The complete trial with the lowest eval loss (pruned ones never ran to the end)."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return min(done, key=lambda t: t.value) if done else None


def results_table(study: optuna.Study, space_names: list[str]) -> Table:
    best = best_trial(study)
    table = Table(title=f"study {study.study_name}")
    table.add_column("trial", justify="right")
    table.add_column("state")
    for name in space_names:
        table.add_column(name, justify="right")
    table.add_column("eval loss", justify="right")
    table.add_column("seconds", justify="right")
    for t in study.get_trials(deepcopy=False):
        mark = " *" if best is not None and t.number == best.number else ""
        loss = "—" if t.value is None else f"{t.value:.4f}"
        if t.state == TrialState.PRUNED and t.intermediate_values:
            step = max(t.intermediate_values)
            loss = f"{t.intermediate_values[step]:.4f} @ step {step}"
        table.add_row(
            f"{t.number}{mark}",
            t.state.name.lower(),
            *(format_value(t.params[n]) if n in t.params else "—" for n in space_names),
            loss,
            f"{t.duration.total_seconds():.0f}" if t.duration else "—",
        )
    return table


def write_csv(study: optuna.Study, out_dir: Path) -> Path:
    frame = study.trials_dataframe(attrs=("number", "state", "value", "params", "duration"))
    if "duration" in frame:  # a Timedelta prints as "0 days 00:01:02.5"; seconds sort and plot
        frame["duration"] = frame["duration"].dt.total_seconds().round(1)
        frame = frame.rename(columns={"value": "eval_loss", "duration": "seconds"})
    path = out_dir / "results.csv"
    write_atomic(path, frame.to_csv(index=False))
    return path


def write_plots(study: optuna.Study, out_dir: Path) -> tuple[list[Path], list[str]]:
    """PNG plots (plus interactive HTML when plotly is installed); returns (paths, notes on the
    plots left out)."""
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as mpl_vis

    # Optuna draws through pyplot; a headless backend so a sweep on a server needs no display
    plt.switch_backend("Agg")
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return [], ["plots: no complete trial yet"]
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    notes: list[str] = []
    for name, function in PLOTS.items():
        axes, note = _draw(getattr(mpl_vis, function), study)
        if axes is None:
            notes.append(f"{name}: {note}")
            continue
        figure = axes.figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        path = plot_dir / f"{name}.png"
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        figure.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
        os.replace(tmp, path)
        plt.close(figure)
        written.append(path)
        page = None
        if optuna.visualization.is_available():
            page, _ = _draw(getattr(optuna.visualization, function), study)
        if page is not None:
            path = path.with_suffix(".html")
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            # plotly.min.js written once beside the pages, so they open offline
            page.write_html(tmp, include_plotlyjs="directory")
            os.replace(tmp, path)
            written.append(path)
    return written, notes


def _draw(plot: Any, study: optuna.Study) -> tuple[Any, str]:
    """The plot, or None and why: Optuna warns when it has too little to show (importances
    from a single trial come out all equal), and such a plot misleads."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            drawn = plot(study)
        except (ValueError, RuntimeError) as exc:
            return None, str(exc)
    complaints = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if not complaints:
        return drawn, ""
    if hasattr(drawn, "figure"):  # matplotlib axes: pyplot keeps their figure until closed
        import matplotlib.pyplot as plt

        plt.close(drawn.figure)
    return None, complaints[0]


def write_best(
    study: optuna.Study, user_config: dict[str, Any], out_dir: Path
) -> tuple[Path, FrozenTrial] | None:
    """best.yaml: the user's config (``auto`` kept) with the best trial's values in place."""
    best = best_trial(study)
    if best is None:
        return None
    config = apply_params(user_config, best.params)
    config.pop("output_dir", None)  # a new run directory each time it is trained
    header = (
        f"# tunepilot sweep, study {study.study_name}: trial {best.number} had the lowest "
        f"eval loss, {best.value:.4f}\n# train it: tunepilot train best.yaml\n"
    )
    path = out_dir / "best.yaml"
    write_atomic(path, header + dump_yaml(config))
    return path, best


def format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k} {format_value(v)}" for k, v in params.items())


def format_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
