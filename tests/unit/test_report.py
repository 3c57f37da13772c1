"""The run report: plots drawn from the logged series, one self-contained HTML page, partial files tolerated."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")

from cluster.telemetry.report import plotted_series, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = 10


def _train_line(step: int) -> dict[str, Any]:
    return {
        "step": step,
        "reward/mean": 0.1 * step,
        "reward/std": 0.2,
        "reward/numeric_match/mean": 0.1 * step,
        "rollout/accuracy": 0.05 * step,
        "train/kl_mean": 0.001 * step,
        "rollout/completion_len_mean": 6.0 - 0.1 * step,
        "rollout/completion_len_max": 8.0,
        "rollout/truncated_fraction": 0.1,
        "rollout/zero_spread_groups": 0.5 if step != 3 else None,  # a null from a non-finite value
        "train/tis/ratio_mean": 1.0,
        "train/tis/ratio_min": 0.8,
        "train/tis/ratio_max": 1.3,
        "train/tis/trunc_frac": 0.01,
        "train/loss": 0.5 - 0.01 * step,
        "train/entropy": 1.2,
        "train/clip_frac": 0.02,
        "train/grad_norm": 0.7,
        "sync/logprob_gap_mean": 1e-4,
        "sync/logprob_gap_max": 1e-3,
        "time/generate": 2.0,
        "time/reward": 0.5,
        "time/train": 1.0,
        "time/sync": 0.5,
    }


def _make_run(tmp_path: Path, drop: tuple[str, ...] = ()) -> Path:
    run_dir = tmp_path / "demo-run"
    run_dir.mkdir()
    lines = [json.dumps({"step": 0, "eval/accuracy": 0.25, "eval/questions": 40.0})]
    for step in range(1, STEPS + 1):
        lines.append(json.dumps({k: v for k, v in _train_line(step).items() if k not in drop}))
    lines.append(json.dumps({"step": STEPS, "eval/accuracy": 0.625, "eval/questions": 40.0}))
    lines.append("")  # a blank line
    text = "\n".join(lines) + '\n{"step": 11, "reward/me'  # the run was killed mid-write
    (run_dir / "metrics.jsonl").write_text(text)
    (run_dir / "config.yaml").write_text("name: demo-run\nmodel: assets/tiny-qwen2\nsteps: 10\n")
    eval_dir = run_dir / "eval"
    eval_dir.mkdir()
    for tag, right in (("step_0000", 10), ("step_0010", 25)):
        rows = [
            {
                "index": i,
                "gold": str(100 + i),
                "completion": f"{100 + i if i < right else 7} <end>",
                "correct": i < right,
                "policy_version": 0,
            }
            for i in range(40)
        ]
        (eval_dir / f"eval_{tag}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def _embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_embeds_valid_pngs_and_summary(tmp_path: Path) -> None:
    run_dir = _make_run(tmp_path)
    index = write_report(run_dir)
    assert index == run_dir / "report" / "index.html"
    page = index.read_text()

    series = plotted_series(run_dir)
    for name in ("reward.png", "kl.png", "length.png", "zero_spread.png", "importance.png", "step_time.png"):
        assert name in series
        png = run_dir / "report" / name
        assert png.read_bytes().startswith(PNG_MAGIC), name
    embedded = _embedded_pngs(page)
    assert len(embedded) == len(series)
    assert all(blob.startswith(PNG_MAGIC) for blob in embedded)
    assert {(run_dir / "report" / n).read_bytes() for n in series} == set(embedded)

    # no external resources, no script
    assert "<script" not in page
    assert not re.search(r'(src|href)="(?!data:)', page)

    # header and summary numbers
    assert "demo-run" in page and "assets/tiny-qwen2" in page
    assert "10 (steps 1–10)" in page
    assert "1.000 (step 10)" in page  # final reward/mean
    assert "0.250 (step 0) → 0.625 (step 10)" in page
    assert "4.00 s over 10 steps" in page
    assert "generate 50.0%, reward 12.5%, train 25.0%, sync 12.5%" in page
    assert "1 corrupt, 1 blank" in page

    # config and the last eval's first 20 questions
    assert "<pre>name: demo-run" in page
    assert "25/40 correct" in page
    assert page.count('<td class="completion">') == 20
    assert "119 &lt;end&gt;" in page and "120 &lt;end&gt;" not in page


def test_plotted_series_contains_the_logged_keys(tmp_path: Path) -> None:
    run_dir = _make_run(tmp_path)
    write_report(run_dir)
    series = plotted_series(run_dir)
    assert series["reward.png"] == ["reward/mean", "reward/std", "rollout/accuracy", "eval/accuracy"]
    assert series["kl.png"] == ["train/kl_mean"]
    assert set(series["length.png"]) == {
        "rollout/completion_len_mean",
        "rollout/completion_len_max",
        "rollout/truncated_fraction",
    }
    assert series["zero_spread.png"] == ["rollout/zero_spread_groups"]
    assert {"train/tis/ratio_mean", "train/tis/trunc_frac", "sync/logprob_gap_mean"} <= set(
        series["importance.png"]
    )
    assert series["step_time.png"] == ["time/generate", "time/reward", "time/train", "time/sync"]
    assert series["reward_terms.png"] == ["reward/numeric_match/mean"]
    manifest = json.loads((run_dir / "report" / "manifest.json").read_text())
    assert manifest["plotted"] == series


def test_missing_series_skips_its_plot(tmp_path: Path) -> None:
    run_dir = _make_run(
        tmp_path, drop=("train/kl_mean", *(f"time/{p}" for p in ("generate", "reward", "train", "sync")))
    )
    page = write_report(run_dir).read_text()
    series = plotted_series(run_dir)
    assert "kl.png" not in series and "step_time.png" not in series
    assert not (run_dir / "report" / "kl.png").exists()
    assert not (run_dir / "report" / "step_time.png").exists()
    assert "Skipped, no series logged" in page and "kl.png" in page and "step_time.png" in page
    assert "no time/* logged" in page
    assert (run_dir / "report" / "reward.png").exists()


def test_stale_png_removed_when_series_disappears(tmp_path: Path) -> None:
    run_dir = _make_run(tmp_path)
    write_report(run_dir)
    assert (run_dir / "report" / "kl.png").exists()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text(
        "\n".join(line.replace('"train/kl_mean"', '"x"') for line in lines)
    )
    write_report(run_dir)
    assert not (run_dir / "report" / "kl.png").exists()


def test_missing_metrics_names_the_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "never-started"
    run_dir.mkdir()
    with pytest.raises(FileNotFoundError, match="never-started"):
        write_report(run_dir)
    with pytest.raises(FileNotFoundError, match="never-started"):
        plotted_series(run_dir)


def test_minimal_run_without_config_or_eval(tmp_path: Path) -> None:
    run_dir = tmp_path / "bare"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.5}\n')
    page = write_report(run_dir).read_text()
    assert plotted_series(run_dir) == {"reward.png": ["reward/mean"]}
    assert "No config.yaml" in page and "No eval results" in page
    assert "<h1>bare</h1>" in page


def test_pool_plot_shows_workers_per_step(tmp_path: Path) -> None:
    run_dir = _make_run(tmp_path)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()[:-1]  # drop the cut-off last line
    workers = {s: (1.0 if s < 4 or s > 7 else 2.0) for s in range(1, STEPS + 1)}
    pool = [
        json.dumps(
            {"step": s, "pool/workers": w, "pool/restarts": float(s == 5), "pool/requeued_prompts": 0.0}
        )
        for s, w in workers.items()
    ]
    (run_dir / "metrics.jsonl").write_text("\n".join([*lines, *pool]) + "\n")
    write_report(run_dir)
    series = plotted_series(run_dir)
    assert series["pool.png"] == ["pool/workers", "pool/restarts", "pool/requeued_prompts"]
    assert (run_dir / "report" / "pool.png").read_bytes().startswith(PNG_MAGIC)
