"""The report's HTML page: a summary table, the plots embedded as data URIs, the last eval, the config."""

from __future__ import annotations

import base64
import html
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cluster.telemetry.metrics import Metrics
from cluster.telemetry.report.plots import TIME_KEYS, value_at
from cluster.telemetry.report.read import EvalResults

EVAL_ROWS_SHOWN = 20


@dataclass
class Summary:
    rows: list[tuple[str, str]]


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def summarise(m: Metrics) -> Summary:
    """The summary table's rows: steps, final reward, accuracies, step time and its split, lines skipped."""
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
        values = {k: value_at(m, step, k) for k in TIME_KEYS}
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


def html_page(
    run_dir: Path,
    config_text: str | None,
    config: dict[str, Any],
    summary: Summary,
    images: list[tuple[str, str, list[str], Path]],
    skipped: dict[str, str],
    plot_error: str | None,
    evals: EvalResults | None,
) -> str:
    """The whole self-contained page; `images` are (file, title, keys, PNG path) of the drawn plots."""
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
