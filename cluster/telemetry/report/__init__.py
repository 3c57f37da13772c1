"""A run report: PNG plots of the logged metrics and one self-contained HTML page (plots embedded).

    grpo-ray report runs/demo        # writes runs/demo/report/index.html (+ the PNGs)

Reads RUN_DIR/metrics.jsonl (lines merged by step; blank or corrupt lines skipped and counted, so a
file cut short by a killed run still reports), RUN_DIR/config.yaml and the last RUN_DIR/eval/*.jsonl.
`plotted_series` tells which metric keys each PNG shows; the same map is written to
RUN_DIR/report/manifest.json. Modules: `read` (the run dir), `plots` (PNGs), `page` (HTML).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cluster.telemetry.metrics import read_metrics
from cluster.telemetry.report.page import html_page, summarise
from cluster.telemetry.report.plots import PLOTS, plot_plan, render_plot
from cluster.telemetry.report.read import last_eval, read_config

REPORT_DIR = "report"


def plotted_series(run_dir: Path) -> dict[str, list[str]]:
    """Per PNG file name, the metric keys it plots (plots with nothing to draw are absent).

    Computed from metrics.jsonl with the same plan `write_report` draws from; `write_report` also
    records it in RUN_DIR/report/manifest.json.
    """
    return plot_plan(read_metrics(Path(run_dir)))[0]


def write_report(run_dir: Path) -> Path:
    """Draw the plots into RUN_DIR/report/ and write RUN_DIR/report/index.html; returns the HTML path.

    Raises FileNotFoundError (naming the run dir) when RUN_DIR/metrics.jsonl is missing.
    """
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    config_text, config = read_config(run_dir)
    out_dir = run_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)

    plotted, skipped = plot_plan(metrics)
    images: list[tuple[str, str, list[str], Path]] = []
    plot_error: str | None = None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plot_error = "matplotlib is not installed (pip install matplotlib)"
    for spec in PLOTS:
        path = out_dir / spec.file
        if spec.file in plotted and plot_error is None:
            render_plot(spec, metrics, plotted[spec.file], path)
            images.append((spec.file, spec.title, plotted[spec.file], path))
        else:
            path.unlink(missing_ok=True)  # a PNG left from an earlier report would be stale

    (out_dir / "manifest.json").write_text(
        json.dumps({"plotted": plotted, "skipped": skipped}, indent=2) + "\n"
    )
    page = html_page(
        run_dir, config_text, config, summarise(metrics), images, skipped, plot_error, last_eval(run_dir)
    )
    target = out_dir / "index.html"
    tmp = target.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, target)
    return target
