"""The CLI's verbs and help, and the metrics sinks (JSONL always, wandb offline when enabled)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.config import load_config
from cluster.telemetry.metrics import MetricsSink, read_metrics

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


@pytest.mark.parametrize("verb", ["train", "check", "eval", "export", "report"])
def test_every_verb_has_help(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    assert verb in capsys.readouterr().out


def test_check_prints_the_plan_without_loading_a_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(DEMO), "steps=4"]) == 0
    out = capsys.readouterr().out
    assert "4 steps = 64 prompts" in out and "config ok" in out


def test_bad_config_is_one_message_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(DEMO), "learner.lora.rnak=4"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'rank'" in err and "Traceback" not in err


def test_missing_run_dir_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "nope"), "--merged", str(tmp_path / "out")]) == 2
    assert "no config.yaml found" in capsys.readouterr().err


def test_jsonl_sink_round_trip_and_nan(tmp_path: Path) -> None:
    sink = MetricsSink(load_config(DEMO), tmp_path)
    sink.log(1, {"reward/mean": 0.5, "train/kl_mean": float("nan")})
    sink.close()
    assert read_metrics(tmp_path).records == [{"step": 1, "reward/mean": 0.5, "train/kl_mean": None}]


def test_wandb_offline_writes_locally_with_the_config(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    cfg = load_config(DEMO, ["logging.wandb=true", "logging.wandb_mode=offline", "name=wb"])
    sink = MetricsSink(cfg, tmp_path)
    sink.log(1, {"reward/mean": 0.25})
    sink.log(2, {"reward/mean": 0.75})
    sink.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "offline mode writes a local run and sends nothing"
    # Offline runs keep config and history in the run's record file until `wandb sync`. wandb's
    # service process may still be flushing it when finish() returns, so wait (bounded) for it.
    record_file = next(runs[0].glob("run-*.wandb"))
    deadline = time.monotonic() + 15
    while b"reward/mean" not in record_file.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    records = record_file.read_bytes()
    assert b'"micro_batch_size":64' in records and b"reward/mean" in records
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["reward/mean"] == 0.75


def test_a_hub_id_that_cannot_be_fetched_is_one_message_before_any_actor(tmp_path: Path) -> None:
    # A fresh, empty Hugging Face cache and the hub switched off: the real huggingface_hub answers
    # "not found locally". The run used to get that far as a 40-line transformers traceback from the
    # tokenizer's load; now it stops before Ray with what to do.
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    args = ["train", "demo", "model=nobody/not-downloaded", "steps=1", f"run_root={tmp_path / 'runs'}"]
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "error: model 'nobody/not-downloaded' is not a local directory, not in the Hugging Face cache"
        )
    )
    assert "huggingface-cli download nobody/not-downloaded" in done.stderr
    assert not (tmp_path / "runs" / "demo").exists()  # refused before the run directory was made
