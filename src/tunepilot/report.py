"""One self-contained HTML page per run, and the key figures of many runs.

``report.html`` opens offline anywhere: the CSS is inline, the curves are PNGs embedded as
base64 data URIs (also written beside it under ``plots/``), there is no script and no external
reference. Every piece of text that comes from the run (reasons, sample generations, event
messages, the config) is HTML-escaped, since model output can contain anything.
"""

from __future__ import annotations

import base64
import math
import statistics
import time
from html import escape
from pathlib import Path
from typing import Any

from tunepilot import __version__
from tunepilot.errors import UserError
from tunepilot.plots import Plot, make_plots, predicted_memory_gb, resting_memory_gb
from tunepilot.rundir import RunFiles, is_run_dir, read_run, series, step_seconds

CSS_PATH = Path(__file__).with_name("report.css")


def build_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` (and ``run_dir/plots/*.png``); returns the HTML's path."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    plots = make_plots(run, run_dir / "plots")
    page = render(run, plots)
    out = run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    return out


def list_runs(root: Path, damaged: list[str] | None = None) -> list[dict[str, Any]]:
    """Key figures of every run directory (one with plan.json) under ``root``, oldest first;
    ``damaged`` collects one line per run that could not be read."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory; pass the folder that holds your runs")
    dirs = [root] if is_run_dir(root) else []
    dirs += sorted(p.parent for p in root.rglob("plan.json") if p.parent != root)
    runs = []
    for d in dirs:
        try:
            run = read_run(d)
        except UserError as exc:  # a damaged run should not hide the others
            if damaged is not None:
                damaged.append(str(exc))
            continue
        figures = key_figures(run)
        figures["name"] = str(d.relative_to(root)) if d != root else d.name
        runs.append(figures)
    return sorted(runs, key=lambda r: r["started"])


def key_figures(run: RunFiles) -> dict[str, Any]:
    """The numbers a run is compared by; None where the run has no such number (yet)."""
    summary = run.summary or {}
    model = run.plan.get("model") or {}
    before, after = summary.get("before") or {}, summary.get("after") or {}
    _, losses = series(run.steps, "loss")
    _, rates = series(run.steps, "tokens_per_s")
    rate = summary.get("real_tokens_per_s")
    return {
        "name": run.name,
        "path": str(run.path),
        "date": run.date,
        "started": run.started,
        "model": model.get("name"),
        "method": model.get("method"),
        "steps": summary.get("steps", int(run.steps[-1]["step"]) if run.steps else 0),
        "final_loss": losses[-1] if losses else None,
        "eval_loss_before": before.get("loss"),
        "eval_loss_after": after.get("loss"),
        "exact_match_before": (before.get("exact_match") or {}).get("accuracy"),
        "exact_match_after": (after.get("exact_match") or {}).get("accuracy"),
        "tokens_per_s": rate if rate is not None else (statistics.mean(rates) if rates else None),
        "train_seconds": summary.get("train_seconds"),
        # train writes eval.json with "before" first and completes it at the end
        "finished": bool(after),
    }


# ---- formatting helpers -------------------------------------------------------------------


def fmt(value: Any, digits: int = 4) -> str:
    """A number as people read it; an em dash for missing or non-finite values."""
    if value is None or isinstance(value, bool):
        return "—" if value is None else ("yes" if value else "no")
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3g}"
        return f"{value:.{digits}g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, int | float) else "—"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Rows are already-escaped HTML cells."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _section(ident: str, title: str, body: str, note: str = "") -> str:
    note_html = f'<p class="note">{note}</p>' if note else ""
    return f'<section id="{ident}"><h2>{escape(title)}</h2>{note_html}{body}</section>'


# ---- sections -----------------------------------------------------------------------------


def render(run: RunFiles, plots: list[Plot]) -> str:
    """The whole page as a string."""
    figures = key_figures(run)
    sections = [
        _cards(figures, run),
        _curves(plots),
        _events(run),
        _resources(run),
        _evaluation(run),
        _plan(run),
        _config(run),
    ]
    problems = "".join(f"<li>{escape(p)}</li>" for p in run.problems)
    warn = f'<ul class="problems">{problems}</ul>' if problems else ""
    model = run.plan.get("model") or {}
    hardware = run.plan.get("hardware") or {}
    subtitle = " · ".join(
        escape(str(x))
        for x in (
            figures["date"],
            model.get("name"),
            model.get("method"),
            f"{hardware.get('device', '?')} {hardware.get('name', '')}".strip(),
        )
        if x
    )
    status = "" if figures["finished"] else '<span class="badge warn">unfinished</span>'
    generated = time.strftime("%Y-%m-%d %H:%M")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(run.name)} · tunepilot report</title>
<style>{CSS_PATH.read_text(encoding="utf-8")}</style></head>
<body><main>
<header><h1>{escape(run.name)} {status}</h1><p class="subtitle">{subtitle}</p>{_nav(run)}</header>
{warn}{"".join(sections)}
<footer>tunepilot {escape(__version__)} · report generated {generated} ·
{escape(str(run.path))}</footer>
</main></body></html>
"""


def _nav(run: RunFiles) -> str:
    links = [("curves", "Curves"), ("resources", "Memory & speed"), ("eval", "Evaluation")]
    if run.events is not None:
        links.insert(1, ("events", "Guardian events"))
    links += [("plan", "Plan"), ("config", "Config")]
    return "<nav>" + "".join(f'<a href="#{i}">{t}</a>' for i, t in links) + "</nav>"


def _cards(f: dict[str, Any], run: RunFiles) -> str:
    def card(label: str, value: str, detail: str = "") -> str:
        sub = f'<div class="detail">{detail}</div>' if detail else ""
        return (
            f'<div class="card"><div class="label">{label}</div>'
            f'<div class="value">{value}</div>{sub}</div>'
        )

    total = (run.plan.get("knobs", {}).get("total_steps") or {}).get("value")
    steps = f"{fmt(f['steps'])}" + (f" / {fmt(total)}" if total and total != f["steps"] else "")
    secs = f["train_seconds"]
    cards = [
        card("steps", steps, f"{fmt(secs, 3)} s of training" if secs is not None else ""),
        card("final train loss", fmt(f["final_loss"])),
        card(
            "eval loss",
            f"{fmt(f['eval_loss_before'], 3)} → {fmt(f['eval_loss_after'], 3)}",
            "before → after",
        ),
    ]
    if f["exact_match_before"] is not None or f["exact_match_after"] is not None:
        cards.append(
            card(
                "exact match",
                f"{pct(f['exact_match_before'])} → {pct(f['exact_match_after'])}",
                "greedy, before → after",
            )
        )
    rate = f["tokens_per_s"]
    cards.append(
        card("throughput", fmt(round(rate)) if rate else "—", "real tokens / s, whole run")
    )
    return '<section class="cards">' + "".join(cards) + "</section>"


def _curves(plots: list[Plot]) -> str:
    if not plots:
        return _section("curves", "Curves", "<p>No training steps were logged yet.</p>")
    figures = "".join(
        f"<figure><figcaption><strong>{escape(p.title)}</strong> <span>{escape(p.caption)}"
        f'</span></figcaption><img src="{_data_uri(p.path)}" alt="{escape(p.title)} curve" '
        f'width="640" height="320"></figure>'
        for p in plots
    )
    return _section("curves", "Curves", f'<div class="grid">{figures}</div>')


def _events(run: RunFiles) -> str:
    if run.events is None:
        return ""
    if not run.events:
        return _section("events", "Guardian events", "<p>None: every step was accepted.</p>")
    rows = [
        [
            f'<span class="event-no">{i}</span>',
            escape(fmt(e.get("step"))),
            f'<span class="badge">{escape(str(e.get("kind", "")))}</span>',
            escape(str(e.get("action", ""))),
            escape(str(e.get("message", ""))),
        ]
        for i, e in enumerate(run.events, start=1)
    ]
    note = "Numbered as the dashed red lines on the loss curve."
    return _section(
        "events",
        "Guardian events",
        _table(["#", "step", "kind", "action", "message"], rows),
        note,
    )


def _resources(run: RunFiles) -> str:
    predicted = predicted_memory_gb(run.plan)
    _, measured = series(run.steps, "memory_gb")
    peak = max(measured) if measured else None
    estimate = run.plan.get("memory_estimate_gb") or {}
    parts = ", ".join(
        f"{k.removesuffix('_gb')} {fmt(v, 3)}"
        for k, v in estimate.items()
        if k not in ("total_gb", "budget_gb") and isinstance(v, int | float)
    )
    resting = resting_memory_gb(run.plan)
    if resting:
        parts += f", the process before loading the model {fmt(resting, 3)}"
    ratio = f"{peak / predicted:.2f}× predicted" if peak and predicted else ""
    device = (run.plan.get("hardware") or {}).get("device")
    how = (
        "peak CUDA memory allocated" if device == "cuda" else "peak resident memory of the process"
    ) + " during training"
    _, times = step_seconds(run.steps)
    _, rates = series(run.steps, "tokens_per_s")
    # the first step pays one-off costs (allocator warm-up, kernel selection): shown apart
    steady = times[1:] or times
    rows = [
        ["predicted peak memory", f"{fmt(predicted, 3)} GB", escape(parts)],
        ["measured peak memory", f"{fmt(peak, 3)} GB", escape(f"{how}; {ratio}".strip("; "))],
        [
            "memory budget",
            f"{fmt(estimate.get('budget_gb'), 3)} GB",
            "what the planner aimed under",
        ],
        [
            "step time (median)",
            f"{fmt(statistics.median(steady), 3)} s" if steady else "—",
            f"first step {fmt(times[0], 3)} s" if times else "",
        ],
        [
            "step time (p90)",
            f"{fmt(_quantile(steady, 0.9), 3)} s" if steady else "—",
            f"over {len(times)} steps",
        ],
        ["throughput (median)", f"{fmt(statistics.median(rates), 4)} tok/s" if rates else "—", ""],
    ]
    return _section("resources", "Memory & speed", _table(["", "value", "detail"], rows, "kv"))


def _unit(value: Any, unit: str) -> str:
    return f"{fmt(value, 3)} {unit}" if isinstance(value, int | float) else "—"


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _evaluation(run: RunFiles) -> str:
    summary = run.summary
    if summary is None:
        return _section("eval", "Evaluation", "<p>No eval.json yet.</p>")
    before, after = summary.get("before") or {}, summary.get("after") or {}
    rows = [
        ["eval loss", fmt(before.get("loss")), fmt(after.get("loss"))],
        ["perplexity", fmt(_ppl(before.get("loss"))), fmt(_ppl(after.get("loss")))],
    ]
    em_b, em_a = before.get("exact_match") or {}, after.get("exact_match") or {}
    if em_b or em_a:
        rows.append(["exact match", _em(em_b), _em(em_a)])
    body = _table(["", "before", "after"], rows, "kv compare")
    body += _samples(em_b.get("samples") or [], em_a.get("samples") or [])
    return _section("eval", "Evaluation", body)


def _ppl(loss: Any) -> float | None:
    if not isinstance(loss, int | float) or not math.isfinite(loss) or loss > 50:
        return None
    return math.exp(loss)


def _em(em: dict[str, Any]) -> str:
    if not em:
        return "—"
    return f"{fmt(em.get('correct'))}/{fmt(em.get('total'))} ({pct(em.get('accuracy'))})"


def _samples(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> str:
    """Before and after generations for the same prompts, side by side."""
    if not before and not after:
        return ""
    by_where: dict[str, dict[str, Any]] = {}
    for label, samples in (("before", before), ("after", after)):
        for s in samples:
            entry = by_where.setdefault(
                str(s.get("where", "?")), {"expected": s.get("expected"), "prompt": s.get("prompt")}
            )
            entry[label] = s
    rows = []
    for where, entry in by_where.items():
        prompt = entry.get("prompt")  # runs before session 23 recorded none
        cells = [
            f'<div class="where">{escape(where)}</div>'
            + (f'<pre class="prompt">{escape(str(prompt))}</pre>' if prompt else "")
            + f"<pre>{escape(str(entry['expected']))}</pre>"
        ]
        for label in ("before", "after"):
            s = entry.get(label)
            if s is None:
                cells.append('<span class="muted">—</span>')
                continue
            ok = s.get("correct")
            mark = '<span class="ok">✓ match</span>' if ok else '<span class="bad">✗ differs</span>'
            cells.append(f"{mark}<pre>{escape(str(s.get('generated', '')))}</pre>")
        rows.append(cells)
    return "<h3>Sample generations</h3>" + _table(
        ["prompt (its end) and expected answer", "before training", "after training"],
        rows,
        "samples",
    )


def _plan(run: RunFiles) -> str:
    knobs = run.plan.get("knobs") or {}
    rows = []
    for name, k in knobs.items():
        if not isinstance(k, dict):
            continue
        source = escape(str(k.get("source")))
        rows.append(
            [
                f"<code>{escape(name)}</code>",
                f"<code>{escape(fmt(k.get('value')))}</code>",
                f'<span class="badge src-{source}">{source}</span>',
                escape(str(k.get("reason", ""))),
            ]
        )
    body = _table(["knob", "value", "source", "reason"], rows, "plan")
    warnings = run.plan.get("warnings") or []
    if warnings:
        items = "".join(f"<li>{escape(str(w))}</li>" for w in warnings)
        body = f'<ul class="problems">{items}</ul>' + body
    facts = "".join(
        _facts(title, run.plan.get(key) or {})
        for title, key in (("Data", "data"), ("Model", "model"), ("Hardware", "hardware"))
    )
    body += f'<div class="facts-grid">{facts}</div>'
    return _section("plan", "Plan", body, "Every knob, who chose it, and why.")


def _facts(title: str, facts: dict[str, Any]) -> str:
    if not facts:
        return ""
    rows = []
    for key, value in facts.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {fmt(v)}" for k, v in value.items())
        rows.append([escape(key.replace("_", " ")), escape(fmt(value))])
    return f"<div><h3>{escape(title)}</h3>" + _table(["", ""], rows, "kv facts") + "</div>"


def _config(run: RunFiles) -> str:
    if run.config_text is None:
        return ""
    body = (
        "<details><summary>config.yaml (every auto resolved)</summary>"
        f"<pre>{escape(run.config_text)}</pre></details>"
    )
    return _section("config", "Config", body)
