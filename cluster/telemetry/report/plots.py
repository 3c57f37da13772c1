"""The report's PNG plots: which logged keys each one draws (`PLOTS`), and drawing them.

Plots are drawn with matplotlib's Agg canvas (no display, no pyplot global state). A plot whose
series are all absent is skipped.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.telemetry.metrics import Metrics, number

TIME_KEYS = ("time/generate", "time/reward", "time/train", "time/sync")
_TERM_MEAN = re.compile(r"^reward/(.+)/mean$")


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


def value_at(m: Metrics, step: int, key: str) -> float | None:
    """The finite value of `key` at `step`, or None."""
    return number(m.rows.get(step, {}).get(key))


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
                    mean, std = value_at(m, step, "reward/mean"), value_at(m, step, "reward/std")
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
                    lambda s: value_at(m, s, "train/tis/ratio_min"),
                    lambda s: value_at(m, s, "train/tis/ratio_max"),
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
    steps = [s for s in m.steps if any(value_at(m, s, k) is not None for k in keys)]
    heights = {key: [value_at(m, s, key) or 0.0 for s in steps] for key in keys}
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


def _draw_async(fig: Any, m: Metrics, keys: list[str]) -> None:
    """Top: how old the trained groups were (policy versions) and how many were dropped as too old;
    bottom: seconds per step the learner waited for data and each rollout worker sat idle."""
    counts = [k for k in keys if k.startswith("async/")]
    waits = [k for k in keys if k.startswith("time/")]
    rows = bool(counts) + bool(waits)
    row = 1
    if counts:
        ax = fig.add_subplot(rows, 1, row)
        for key in counts:
            _line(ax, m, key, drawstyle="steps-mid")
        _finish(ax, "Staleness of trained groups and groups dropped as too old", "versions / groups")
        row += 1
    if waits:
        ax = fig.add_subplot(rows, 1, row)
        for key in waits:
            _line(ax, m, key)
        _finish(ax, "Learner waiting for data, rollout workers idle", "s per step")


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
        "async.png",
        "Asynchronous rollouts: staleness, waiting, idle",
        _present(
            "async/staleness_mean",
            "async/staleness_max",
            "async/dropped_stale",
            "time/learner_wait",
            "time/rollout_idle",
        ),
        _draw_async,
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
    if spec.file == "async.png":
        return 10.0, 7.0 if any(k.startswith("async/") for k in keys) and "time/learner_wait" in keys else 4.2
    if spec.file == "optimizer.png":
        return 10.0, 3.2 * math.ceil(len(keys) / 2) + 0.6
    return 10.0, 4.2


def plot_plan(m: Metrics) -> tuple[dict[str, list[str]], dict[str, str]]:
    """({PNG file: keys it draws}, {skipped PNG file: its title}) for these metrics."""
    plotted: dict[str, list[str]] = {}
    skipped: dict[str, str] = {}
    for spec in PLOTS:
        keys = spec.keys(m)
        if keys:
            plotted[spec.file] = keys
        else:
            skipped[spec.file] = spec.title
    return plotted, skipped


def render_plot(spec: PlotSpec, m: Metrics, keys: list[str], path: Path) -> None:
    """Draw `spec` with `keys` and save it as a PNG at `path` (needs matplotlib)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=_figure_size(spec, keys), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas, set explicitly: no display, no pyplot backend state
    spec.draw(fig, m, keys)
    fig.savefig(path, format="png")
