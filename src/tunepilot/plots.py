"""Training curves as PNG files, for the HTML report.

Figures are built with matplotlib's object API (``Figure``, rendered by the Agg canvas), never
``pyplot``: no global state, no GUI backend, so it works the same in a headless CI job, a thread
or a notebook. PNGs are written without matplotlib's metadata (it names a web address, and the
report must not reference any).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunepilot.rundir import RunFiles, series, step_seconds

TRAIN = "#2563eb"
EVAL = "#ea580c"
EVENT = "#dc2626"
MUTED = "#64748b"
DPI = 144  # 2x the CSS size in the report, so curves stay sharp on high-density screens


@dataclass(frozen=True)
class Plot:
    name: str  # file stem under plots/
    title: str
    path: Path
    caption: str


def make_plots(run: RunFiles, out_dir: Path) -> list[Plot]:
    """Write every curve the run has data for into ``out_dir``; returns them in report order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots: list[Plot] = []
    builders = [
        ("loss", "Loss", _loss, "train loss per optimizer step; eval loss at each evaluation"),
        ("lr", "Learning rate", _simple("lr", "learning rate"), "after warmup and schedule"),
        ("grad_norm", "Gradient norm", _grad_norm, "global norm before clipping"),
        (
            "tokens_per_s",
            "Throughput",
            _simple("tokens_per_s", "real tokens / s"),
            "real (non-pad) tokens per second of compute",
        ),
        ("step_time", "Step time", _step_time, "compute time of each optimizer step"),
        ("memory", "Memory", _memory, None),
        ("padding", "Padding", _padding, "share of each step's batch that is padding"),
    ]
    for name, title, build, caption in builders:
        fig = build(run)
        if fig is None:
            continue
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=DPI, metadata={"Software": None})
        plots.append(Plot(name, title, path, caption or _memory_caption(run)))
    return plots


def _figure() -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.grid(True, color="#e2e8f0", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#cbd5e1")
    ax.tick_params(colors="#334155", labelsize=9)
    ax.set_xlabel("step", fontsize=9, color="#334155")
    return fig, ax


def _line(ax: Any, xs: list[float], ys: list[float], color: str, label: str) -> None:
    # markers only when there are few points: they show where the data is without clutter
    marker = "o" if len(xs) <= 40 else None
    ax.plot(xs, ys, color=color, linewidth=1.6, marker=marker, markersize=3, label=label)


def _loss(run: RunFiles) -> Any:
    tx, ty = series(run.steps, "loss")
    ex, ey = series(run.evals, "eval_loss")
    if not tx and not ex:
        return None
    fig, ax = _figure()
    if tx:
        _line(ax, tx, ty, TRAIN, "train loss")
    if ex:
        ax.plot(ex, ey, color=EVAL, linewidth=1.6, marker="s", markersize=4, label="eval loss")
    values = [v for v in ty + ey if v > 0]
    if values and max(values) / min(values) > 20:
        # a 20x drop would flatten the interesting end of the curve on a linear axis
        from matplotlib.ticker import FuncFormatter, LogLocator

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    _mark_events(ax, run.events or [])
    ax.set_ylabel("loss per supervised token", fontsize=9, color="#334155")
    ax.legend(fontsize=8, frameon=False)
    return fig


def _mark_events(ax: Any, events: list[dict[str, Any]]) -> None:
    """A dashed vertical line per guardian event, numbered like the report's event table."""
    for number, event in enumerate(events, start=1):
        step = event.get("step")
        if isinstance(step, bool) or not isinstance(step, int | float):
            continue
        ax.axvline(step, color=EVENT, linestyle="--", linewidth=1, alpha=0.8)
        ax.annotate(
            str(number),
            xy=(step, 1),
            xycoords=("data", "axes fraction"),
            xytext=(2, -2),
            textcoords="offset points",
            color=EVENT,
            fontsize=8,
            fontweight="bold",
            va="top",
        )


def _simple(key: str, label: str) -> Any:
    def build(run: RunFiles) -> Any:
        xs, ys = series(run.steps, key)
        if not xs:
            return None
        fig, ax = _figure()
        _line(ax, xs, ys, TRAIN, label)
        ax.set_ylabel(label, fontsize=9, color="#334155")
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        return fig

    return build


def _grad_norm(run: RunFiles) -> Any:
    fig = _simple("grad_norm", "gradient norm")(run)
    if fig is None:
        return None
    clip = (run.plan.get("knobs", {}).get("max_grad_norm") or {}).get("value")
    if isinstance(clip, int | float) and clip > 0:
        ax = fig.axes[0]
        ax.axhline(clip, color=MUTED, linestyle=":", linewidth=1.2, label=f"clip at {clip:g}")
        ax.legend(fontsize=8, frameon=False)
    return fig


def _step_time(run: RunFiles) -> Any:
    xs, ys = step_seconds(run.steps)
    if not xs:
        return None
    fig, ax = _figure()
    _line(ax, xs, ys, TRAIN, "seconds per step")
    ax.set_ylabel("seconds", fontsize=9, color="#334155")
    ax.set_ylim(bottom=0)
    return fig


def _memory(run: RunFiles) -> Any:
    xs, ys = series(run.steps, "memory_gb")
    if not xs:
        return None
    fig, ax = _figure()
    _line(ax, xs, ys, TRAIN, "measured")
    predicted = predicted_memory_gb(run.plan)
    if predicted is not None:
        ax.axhline(predicted, color=EVAL, linestyle="--", linewidth=1.4, label="predicted")
    ax.set_ylabel("GB", fontsize=9, color="#334155")
    ax.set_ylim(bottom=0, top=max([*ys, predicted or 0]) * 1.15 or 1)
    ax.legend(fontsize=8, frameon=False)
    return fig


def _padding(run: RunFiles) -> Any:
    xs, ys = series(run.steps, "padding_fraction")
    if not xs:
        return None
    fig, ax = _figure()
    _line(ax, xs, [100 * y for y in ys], TRAIN, "padding")
    ax.set_ylabel("% of tokens", fontsize=9, color="#334155")
    ax.set_ylim(bottom=0, top=max(5.0, 100 * max(ys) * 1.2))
    return fig


def resting_memory_gb(plan: dict[str, Any]) -> float:
    """What the process held before the model loaded, as the probe read it (0 on CUDA, or
    without a probe): part of a CPU run's measured peak, outside the memory model."""
    value = (plan.get("probe") or {}).get("resting_gb", 0.0)
    return float(value) if isinstance(value, int | float) else 0.0


def predicted_memory_gb(plan: dict[str, Any]) -> float | None:
    """The peak training's memory readings should reach: the memory model's training state,
    plus the process around it where the measurement includes that."""
    value = (plan.get("memory_estimate_gb") or {}).get("total_gb")
    if not isinstance(value, int | float):
        return None
    return float(value) + resting_memory_gb(plan)


def _memory_caption(run: RunFiles) -> str:
    device = (run.plan.get("hardware") or {}).get("device")
    what = "peak CUDA memory allocated" if device == "cuda" else "peak resident memory (RSS)"
    resting = resting_memory_gb(run.plan)
    around = (
        f", plus the {resting:.2f} GB the process held before loading the model" if resting else ""
    )
    return f"measured: {what} during training; predicted: the planner's estimate{around}"
