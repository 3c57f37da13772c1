"""A run report: PNG plots of the logged metrics and one self-contained HTML page (plots embedded).

    python -m cluster.telemetry.report runs/demo        # writes runs/demo/report/index.html (+ the PNGs)

Reads RUN_DIR/metrics.jsonl (lines merged by step; blank or corrupt lines skipped and counted, so a
file cut short by a killed run still reports), RUN_DIR/config.yaml and the last RUN_DIR/eval/*.jsonl.
Plots are drawn with matplotlib's Agg canvas (no display, no pyplot global state). A plot whose
series are all absent is skipped and the page says so. `plotted_series` tells which metric keys each
PNG shows; the same map is written to RUN_DIR/report/manifest.json.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import math
import os
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPORT_DIR = "report"
TIME_KEYS = ("time/generate", "time/reward", "time/train", "time/sync")
EVAL_ROWS_SHOWN = 20
_TERM_MEAN = re.compile(r"^reward/(.+)/mean$")
_EVAL_STEP = re.compile(r"eval_step_(\d+)\.jsonl$")


# --------------------------------------------------------------------------- reading


@dataclass
class Metrics:
    """metrics.jsonl merged by step: `rows[step][key] = value` (a later line wins for the same key)."""

    rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    lines: int = 0
    blank_lines: int = 0
    corrupt_lines: int = 0

    @property
    def steps(self) -> list[int]:
        return sorted(self.rows)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """The finite numeric values of `key`, by step (null, NaN, bools and strings left out)."""
        xs: list[int] = []
        ys: list[float] = []
        for step in self.steps:
            value = _number(self.rows[step].get(key))
            if value is not None:
                xs.append(step)
                ys.append(value)
        return xs, ys

    def has(self, key: str) -> bool:
        return any(_number(row.get(key)) is not None for row in self.rows.values())

    def logged_keys(self) -> set[str]:
        return {k for row in self.rows.values() for k in row}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def read_metrics(run_dir: Path) -> Metrics:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in run dir {run_dir} (looked for {path})")
    metrics = Metrics()
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        metrics.lines += 1
        if not line.strip():
            metrics.blank_lines += 1
            continue
        try:
            record = json.loads(line)
        except ValueError:
            metrics.corrupt_lines += 1
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, int):
            metrics.corrupt_lines += 1
            continue
        metrics.rows.setdefault(step, {}).update({k: v for k, v in record.items() if k != "step"})
    return metrics


def _read_config(run_dir: Path) -> tuple[str | None, dict[str, Any]]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None, {}
    text = path.read_text(errors="replace")
    try:
        import yaml

        parsed = yaml.safe_load(text)
    except Exception:
        parsed = None
    return text, parsed if isinstance(parsed, dict) else {}


@dataclass
class EvalResults:
    path: Path
    step: int | None
    records: list[dict[str, Any]]
    corrupt_lines: int


def _last_eval(run_dir: Path) -> EvalResults | None:
    files = list((run_dir / "eval").glob("eval_*.jsonl"))
    if not files:
        return None

    def order(p: Path) -> tuple[int, str]:
        match = _EVAL_STEP.search(p.name)
        return (int(match.group(1)) if match else -1, p.name)

    path = max(files, key=order)
    records: list[dict[str, Any]] = []
    corrupt = 0
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            corrupt += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            corrupt += 1
    if all(isinstance(r.get("index"), int) and not isinstance(r.get("index"), bool) for r in records):
        records.sort(key=lambda r: r["index"])
    step = order(path)[0]
    return EvalResults(path, step if step >= 0 else None, records, corrupt)


# --------------------------------------------------------------------------- plots


@dataclass(frozen=True)
class PlotSpec:
    """One PNG: `keys` picks the logged keys it will draw (empty = skip), `draw` draws exactly those."""

    file: str
    title: str
    keys: Callable[[Metrics], list[str]]
    draw: Callable[[Any, Metrics, list[str]], None]


def _present(*candidates: str) -> Callable[[Metrics], list[str]]:
    return lambda m: [k for k in candidates if m.has(k)]


def _with_companion(
    main: str, companions: Sequence[str], others: Sequence[str]
) -> Callable[[Metrics], list[str]]:
    """`main`, its `companions` only when `main` is there too (a band needs its centre), then `others`."""

    def keys(m: Metrics) -> list[str]:
        out = [main] if m.has(main) else []
        out += [k for k in companions if out and m.has(k)]
        return out + [k for k in others if m.has(k)]

    return keys


def _line(ax: Any, m: Metrics, key: str, label: str | None = None, **kwargs: Any) -> None:
    xs, ys = m.series(key)
    style = {"marker": "o", "markersize": 3} if len(xs) <= 60 else {}
    ax.plot(xs, ys, label=label or key, **{**style, **kwargs})


def _band(
    ax: Any, m: Metrics, low: Callable[[int], float | None], high: Callable[[int], float | None], **kw: Any
) -> None:
    xs, lows, highs = [], [], []
    for step in m.steps:
        lo, hi = low(step), high(step)
        if lo is not None and hi is not None:
            xs.append(step)
            lows.append(lo)
            highs.append(hi)
    if xs:
        ax.fill_between(xs, lows, highs, alpha=0.2, linewidth=0, **kw)


def _value(m: Metrics, step: int, key: str) -> float | None:
    return _number(m.rows.get(step, {}).get(key))


def _finish(ax: Any, title: str, ylabel: str, xlabel: str = "step", outside: bool = True) -> None:
    """Title, labels, grid, and the legend: right of the axes by default, so it never hides data."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if outside:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize="small")
    else:
        ax.legend(loc="best", fontsize="small")


def _draw_reward(fig: Any, m: Metrics, keys: list[str]) -> None:
    ax = fig.add_subplot(1, 1, 1)
    if "reward/mean" in keys:
        if "reward/std" in keys:

            def spread(sign: float) -> Callable[[int], float | None]:
                def at(step: int) -> float | None:
                    mean, std = _value(m, step, "reward/mean"), _value(m, step, "reward/std")
                    return None if mean is None or std is None else mean + sign * std

                return at

            _band(ax, m, spread(-1.0), spread(1.0), color="C0", label="reward/mean ± reward/std")
        _line(ax, m, "reward/mean", color="C0", linewidth=2.4)
    if "rollout/accuracy" in keys:  # dashed on top: with a 0/1 correctness reward the two coincide
        _line(ax, m, "rollout/accuracy", color="C1", linestyle="--", linewidth=1.2, markersize=2)
    if "eval/accuracy" in keys:
        xs, ys = m.series("eval/accuracy")
        ax.plot(xs, ys, "D", color="C3", markersize=8, label="eval/accuracy\n(held-out, greedy)", zorder=5)
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(
                f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8
            )
    _finish(ax, "Reward and accuracy", "reward / accuracy")


def _draw_kl(fig: Any, m: Metrics, keys: list[str]) -> None:
    ax = fig.add_subplot(1, 1, 1)
    for key in keys:
        _line(ax, m, key)
    _finish(ax, "KL to the reference policy", "KL (mean per token)")


def _draw_length(fig: Any, m: Metrics, keys: list[str]) -> None:
    lengths = [k for k in keys if k.startswith("rollout/completion_len")]
    panels = [p for p in (lengths, [k for k in keys if k == "rollout/truncated_fraction"]) if p]
    for i, panel in enumerate(panels, start=1):
        ax = fig.add_subplot(len(panels), 1, i)
        if panel is lengths:
            for key, color in (("rollout/completion_len_mean", "C0"), ("rollout/completion_len_max", "C2")):
                if key in panel:
                    _line(ax, m, key, color=color)
            _finish(ax, "Completion length", "tokens")
        else:
            _line(ax, m, "rollout/truncated_fraction", color="C3")
            ax.set_ylim(-0.02, 1.02)
            _finish(ax, "Completions truncated at max_new_tokens", "fraction of completions")


def _draw_zero_spread(fig: Any, m: Metrics, keys: list[str]) -> None:
    ax = fig.add_subplot(1, 1, 1)
    _line(ax, m, "rollout/zero_spread_groups")
    ax.set_ylim(-0.02, 1.02)
    _finish(ax, "Groups with zero reward spread (no learning signal)", "fraction of groups")


def _draw_importance(fig: Any, m: Metrics, keys: list[str]) -> None:
    ratio = [k for k in keys if k.startswith("train/tis/ratio")]
    trunc = [k for k in keys if k == "train/tis/trunc_frac"]
    gap = [k for k in keys if k.startswith("sync/")]
    panels = [p for p in (ratio, trunc, gap) if p]
    for i, panel in enumerate(panels, start=1):
        ax = fig.add_subplot(len(panels), 1, i)
        if panel is ratio:
            if "train/tis/ratio_min" in panel and "train/tis/ratio_max" in panel:
                _band(
                    ax,
                    m,
                    lambda s: _value(m, s, "train/tis/ratio_min"),
                    lambda s: _value(m, s, "train/tis/ratio_max"),
                    color="C0",
                    label="train/tis/ratio_min … ratio_max",
                )
            for key in panel:
                if key == "train/tis/ratio_mean":
                    _line(ax, m, key, color="C0")
                elif not ("train/tis/ratio_min" in panel and "train/tis/ratio_max" in panel):
                    _line(ax, m, key, linestyle=":")
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--", label="ratio = 1 (on-policy)")
            _finish(ax, "Importance ratio π_learner / π_sampler", "ratio")
        elif panel is trunc:
            _line(ax, m, "train/tis/trunc_frac", color="C3")
            _finish(ax, "Importance weights truncated at the cap", "fraction of tokens")
        else:
            for key in panel:
                _line(ax, m, key)
            _finish(ax, "Logprob gap learner ↔ rollout engine after sync", "|Δ logprob|")


def _draw_time(fig: Any, m: Metrics, keys: list[str]) -> None:
    ax = fig.add_subplot(1, 1, 1)
    steps = [s for s in m.steps if any(_value(m, s, k) is not None for k in keys)]
    heights = {key: [_value(m, s, key) or 0.0 for s in steps] for key in keys}
    if len(steps) > 150:  # bars that thin alias into stripes: the same stack, drawn as areas
        ax.stackplot(steps, *heights.values(), labels=keys, step="mid", linewidth=0)
    else:
        gaps = [b - a for a, b in itertools.pairwise(steps)]
        width = 0.8 * (min(gaps) if gaps else 1)
        bottom = [0.0] * len(steps)
        for key in keys:
            ax.bar(steps, heights[key], width, bottom=bottom, label=key)
            bottom = [b + h for b, h in zip(bottom, heights[key], strict=True)]
    _finish(ax, "Step time breakdown", "seconds")


def _draw_terms(fig: Any, m: Metrics, keys: list[str]) -> None:
    ax = fig.add_subplot(1, 1, 1)
    for key in keys:
        _line(ax, m, key)
    _finish(ax, "Reward terms (mean per term, before weighting)", "term reward")


def _draw_optimizer(fig: Any, m: Metrics, keys: list[str]) -> None:
    for i, key in enumerate(keys, start=1):
        ax = fig.add_subplot(math.ceil(len(keys) / 2), 2 if len(keys) > 1 else 1, i)
        _line(ax, m, key, color=f"C{i - 1}")
        _finish(ax, key.removeprefix("train/"), key.removeprefix("train/"), outside=False)


def _draw_pool(fig: Any, m: Metrics, keys: list[str]) -> None:
    ax = fig.add_subplot(1, 1, 1)
    for key in keys:
        _line(ax, m, key, drawstyle="steps-mid")
    _finish(ax, "Rollout pool: workers per step, restarts and re-queued prompts", "count")


def _term_keys(m: Metrics) -> list[str]:
    return sorted(k for k in m.logged_keys() if _TERM_MEAN.match(k) and m.has(k))


PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec(
        "reward.png",
        "Reward and accuracy",
        _with_companion("reward/mean", ["reward/std"], ["rollout/accuracy", "eval/accuracy"]),
        _draw_reward,
    ),
    PlotSpec("kl.png", "KL", _present("train/kl_mean"), _draw_kl),
    PlotSpec(
        "length.png",
        "Completion length and truncation",
        _present("rollout/completion_len_mean", "rollout/completion_len_max", "rollout/truncated_fraction"),
        _draw_length,
    ),
    PlotSpec(
        "zero_spread.png", "Zero-spread groups", _present("rollout/zero_spread_groups"), _draw_zero_spread
    ),
    PlotSpec(
        "importance.png",
        "Importance ratio and logprob gap",
        _present(
            "train/tis/ratio_mean",
            "train/tis/ratio_min",
            "train/tis/ratio_max",
            "train/tis/trunc_frac",
            "sync/logprob_gap_mean",
            "sync/logprob_gap_max",
        ),
        _draw_importance,
    ),
    PlotSpec("step_time.png", "Step time breakdown", _present(*TIME_KEYS), _draw_time),
    PlotSpec("reward_terms.png", "Reward terms", _term_keys, _draw_terms),
    PlotSpec(
        "pool.png",
        "Rollout pool",
        _present("pool/workers", "pool/joining", "pool/restarts", "pool/requeued_prompts"),
        _draw_pool,
    ),
    PlotSpec(
        "optimizer.png",
        "Loss, entropy, clipping, gradient norm",
        _present("train/loss", "train/entropy", "train/clip_frac", "train/grad_norm"),
        _draw_optimizer,
    ),
)


def _figure_size(spec: PlotSpec, keys: list[str]) -> tuple[float, float]:
    if spec.file == "importance.png":
        panels = sum(
            bool(group)
            for group in (
                [k for k in keys if k.startswith("train/tis/ratio")],
                [k for k in keys if k == "train/tis/trunc_frac"],
                [k for k in keys if k.startswith("sync/")],
            )
        )
        return 10.0, 3.2 * panels + 0.6
    if spec.file == "length.png":
        panels = any(k.startswith("rollout/completion_len") for k in keys) + (
            "rollout/truncated_fraction" in keys
        )
        return 10.0, 3.2 * panels + 0.6
    if spec.file == "optimizer.png":
        return 10.0, 3.2 * math.ceil(len(keys) / 2) + 0.6
    return 10.0, 4.2


def _plot_plan(m: Metrics) -> tuple[dict[str, list[str]], dict[str, str]]:
    plotted: dict[str, list[str]] = {}
    skipped: dict[str, str] = {}
    for spec in PLOTS:
        keys = spec.keys(m)
        if keys:
            plotted[spec.file] = keys
        else:
            skipped[spec.file] = spec.title
    return plotted, skipped


def plotted_series(run_dir: Path) -> dict[str, list[str]]:
    """Per PNG file name, the metric keys it plots (plots with nothing to draw are absent).

    Computed from metrics.jsonl with the same plan `write_report` draws from; `write_report` also
    records it in RUN_DIR/report/manifest.json.
    """
    return _plot_plan(read_metrics(Path(run_dir)))[0]


def _render_plot(spec: PlotSpec, m: Metrics, keys: list[str], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=_figure_size(spec, keys), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas, set explicitly: no display, no pyplot backend state
    spec.draw(fig, m, keys)
    fig.savefig(path, format="png")


# --------------------------------------------------------------------------- summary


@dataclass
class Summary:
    rows: list[tuple[str, str]]


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _summary(m: Metrics) -> Summary:
    rows: list[tuple[str, str]] = []
    train_steps = [s for s in m.steps if any(not k.startswith("eval/") for k in m.rows[s])]
    if train_steps:
        rows.append(
            ("Training steps logged", f"{len(train_steps)} (steps {train_steps[0]}–{train_steps[-1]})")
        )
    else:
        rows.append(("Training steps logged", "0"))
    xs, ys = m.series("reward/mean")
    rows.append(("Final reward (mean)", f"{_fmt(ys[-1])} (step {xs[-1]})" if ys else "–"))
    xs, ys = m.series("rollout/accuracy")
    if ys:
        rows.append(("Rollout accuracy first → last", f"{_fmt(ys[0])} → {_fmt(ys[-1])}"))
    xs, ys = m.series("eval/accuracy")
    if ys:
        rows.append(
            (
                "Eval accuracy first → last",
                f"{_fmt(ys[0])} (step {xs[0]}) → {_fmt(ys[-1])} (step {xs[-1]})",
            )
        )
    else:
        rows.append(("Eval accuracy first → last", "– (no eval logged)"))
    totals = {k: 0.0 for k in TIME_KEYS}
    per_step: list[float] = []
    for step in m.steps:
        values = {k: _value(m, step, k) for k in TIME_KEYS}
        if any(v is not None for v in values.values()):
            per_step.append(sum(v or 0.0 for v in values.values()))
            for k, v in values.items():
                totals[k] += v or 0.0
    if per_step:
        grand = sum(totals.values())
        split = ", ".join(
            f"{k.removeprefix('time/')} {100 * totals[k] / grand:.1f}%" for k in TIME_KEYS if grand > 0
        )
        rows.append(("Mean step time", f"{statistics.fmean(per_step):.2f} s over {len(per_step)} steps"))
        rows.append(("Step time split", split or "–"))
    else:
        rows.append(("Mean step time", "– (no time/* logged)"))
    skipped = m.blank_lines + m.corrupt_lines
    rows.append(
        (
            "metrics.jsonl lines skipped",
            f"{skipped} of {m.lines} ({m.corrupt_lines} corrupt, {m.blank_lines} blank)",
        )
    )
    return Summary(rows)


# --------------------------------------------------------------------------- HTML

_CSS = """
* { box-sizing: border-box; }
body { margin: 0; background: #f4f5f7; color: #1d2330;
       font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1080px; margin: 0 auto; padding: 24px 20px 48px; }
header { border-bottom: 3px solid #3b6fd8; margin-bottom: 20px; padding-bottom: 8px; }
h1 { margin: 0 0 4px; font-size: 26px; }
h2 { margin: 32px 0 12px; font-size: 19px; border-bottom: 1px solid #d5d9e0; padding-bottom: 4px; }
.meta { color: #5a6375; font-size: 13px; }
.meta code { background: #e8ebf0; padding: 1px 5px; border-radius: 3px; }
table { border-collapse: collapse; background: #fff; width: 100%; box-shadow: 0 1px 2px rgba(0,0,0,.06); }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid #e4e7ec; vertical-align: top; }
th { background: #eef1f6; font-weight: 600; }
table.summary th { width: 34%; background: #f7f8fa; }
td.num { font-variant-numeric: tabular-nums; }
td.completion { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 13px;
                white-space: pre-wrap; word-break: break-word; }
.ok { color: #1a7f37; font-weight: 600; }
.bad { color: #c62828; font-weight: 600; }
figure { margin: 0 0 18px; background: #fff; padding: 8px; box-shadow: 0 1px 2px rgba(0,0,0,.06); }
figure img { display: block; width: 100%; height: auto; }
figcaption { color: #5a6375; font-size: 12px; padding: 4px 4px 0; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 8px 12px; margin: 8px 0; }
pre { background: #1e2230; color: #e6e8ee; padding: 12px 14px; overflow-x: auto; font-size: 13px;
      line-height: 1.4; border-radius: 4px; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _html(
    run_dir: Path,
    config_text: str | None,
    config: dict[str, Any],
    summary: Summary,
    images: list[tuple[str, str, list[str], Path]],
    skipped: dict[str, str],
    plot_error: str | None,
    evals: EvalResults | None,
) -> str:
    name = config.get("name") or run_dir.name
    model = config.get("model") or "unknown model"
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(name)} — GRPO run report</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f"<header><h1>{_esc(name)}</h1>",
        f'<div class="meta">model <code>{_esc(model)}</code> · run dir <code>{_esc(run_dir)}</code> · '
        f"report generated {_esc(generated)}</div></header>",
        "<h2>Summary</h2>",
        '<table class="summary">',
    ]
    out += [f'<tr><th>{_esc(k)}</th><td class="num">{_esc(v)}</td></tr>' for k, v in summary.rows]
    out.append("</table>")

    out.append("<h2>Plots</h2>")
    if plot_error:
        out.append(f'<p class="note">Plots not drawn: {_esc(plot_error)}</p>')
    for _file, title, keys, path in images:
        out.append(
            f'<figure><img src="{_png_uri(path)}" alt="{_esc(title)}">'
            f"<figcaption>{_esc(path.name)} — {_esc(', '.join(keys))}</figcaption></figure>"
        )
    if skipped:
        items = ", ".join(f"{_esc(title)} ({_esc(file)})" for file, title in skipped.items())
        out.append(f'<p class="note">Skipped, no series logged: {items}.</p>')

    out.append("<h2>Eval results</h2>")
    if evals is None:
        out.append('<p class="note">No eval results (no eval/eval_*.jsonl in the run dir).</p>')
    else:
        n = len(evals.records)
        right = sum(1 for r in evals.records if r.get("correct") is True)
        at = f"step {evals.step}" if evals.step is not None else evals.path.name
        acc = f"{right}/{n} correct ({right / n:.1%})" if n else "no questions"
        shown = min(n, EVAL_ROWS_SHOWN)
        out.append(
            f'<p class="meta">Last eval, {_esc(at)} (<code>{_esc(evals.path.name)}</code>): {_esc(acc)}; '
            f"first {shown} questions shown"
            + (f"; {evals.corrupt_lines} corrupt lines skipped" if evals.corrupt_lines else "")
            + ".</p>"
        )
        out.append(
            "<table><tr><th>#</th><th>gold</th><th>completion</th><th>correct</th><th>policy</th></tr>"
        )
        for record in evals.records[:EVAL_ROWS_SHOWN]:
            ok = record.get("correct")
            verdict = '<span class="ok">✓</span>' if ok is True else '<span class="bad">✗</span>'
            out.append(
                f'<tr><td class="num">{_esc(record.get("index", ""))}</td>'
                f'<td class="num">{_esc(record.get("gold", ""))}</td>'
                f'<td class="completion">{_esc(record.get("completion", ""))}</td>'
                f"<td>{verdict}</td>"
                f'<td class="num">{_esc(record.get("policy_version", ""))}</td></tr>'
            )
        out.append("</table>")

    out.append("<h2>Config</h2>")
    out.append(
        f"<pre>{_esc(config_text)}</pre>"
        if config_text is not None
        else '<p class="note">No config.yaml in the run dir.</p>'
    )
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


def write_report(run_dir: Path) -> Path:
    """Draw the plots into RUN_DIR/report/ and write RUN_DIR/report/index.html; returns the HTML path.

    Raises FileNotFoundError (naming the run dir) when RUN_DIR/metrics.jsonl is missing.
    """
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    config_text, config = _read_config(run_dir)
    out_dir = run_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)

    plotted, skipped = _plot_plan(metrics)
    images: list[tuple[str, str, list[str], Path]] = []
    plot_error: str | None = None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plot_error = "matplotlib is not installed (pip install matplotlib)"
    for spec in PLOTS:
        path = out_dir / spec.file
        if spec.file in plotted and plot_error is None:
            _render_plot(spec, metrics, plotted[spec.file], path)
            images.append((spec.file, spec.title, plotted[spec.file], path))
        else:
            path.unlink(missing_ok=True)  # a PNG left from an earlier report would be stale

    (out_dir / "manifest.json").write_text(
        json.dumps({"plotted": plotted, "skipped": skipped}, indent=2) + "\n"
    )
    page = _html(
        run_dir, config_text, config, _summary(metrics), images, skipped, plot_error, _last_eval(run_dir)
    )
    target = out_dir / "index.html"
    tmp = target.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m cluster.telemetry.report RUN_DIR", file=sys.stderr)
        return 2
    try:
        print(write_report(Path(args[0])))
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
