"""Reward workers (issue 16): they import what the user's shell imports (the working directory is on
their path), they get a memory limit (killed and restarted above it, samples masked and counted), and
what a reward prints is kept out of the console (the tail goes to the run's reward log)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rewards import RewardsConfig, RewardScorer

ROOT = Path(__file__).resolve().parents[2]
TESTS_DIR = str(ROOT / "tests")


@pytest.fixture(autouse=True)
def _fixtures_importable() -> Iterator[None]:
    sys.path.insert(0, TESTS_DIR)
    yield
    sys.path.remove(TESTS_DIR)


def _config(function: str, **limits: Any) -> RewardsConfig:
    return RewardsConfig.model_validate({"terms": [{"function": function}], "timeout_s": 10.0, **limits})


def test_reward_module_in_the_working_directory_is_found(tmp_path: Path) -> None:
    # A console script (grpo-ray) has no working directory on sys.path; `python -P` reproduces that.
    (tmp_path / "myrewards").mkdir()
    (tmp_path / "myrewards" / "__init__.py").write_text("")
    (tmp_path / "myrewards" / "bad.py").write_text(
        "def one_value(completions, rows):\n    return [1.0] * len(completions)\n"
    )
    code = textwrap.dedent(
        """
        import sys
        assert not any(p in ("", ".") or p == __import__("os").getcwd() for p in sys.path), sys.path
        from rewards import RewardsConfig, RewardScorer
        config = RewardsConfig.model_validate({"terms": [{"function": "myrewards.bad:one_value"}]})
        with RewardScorer(config) as scorer:
            print(scorer.score(["a", "b"], [{"gold": "1"}, {"gold": "2"}]).rewards)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-P", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[1.0, 1.0]"


def test_a_leaking_worker_is_restarted(tmp_path: Path) -> None:
    # 64 MiB kept per call; the limit 256 MiB is crossed after ~3-4 calls (python start ~30 MiB): either
    # during a call (killed, that sample masked 'memory') or just after one (restarted before the next).
    # Which of the two depends on the poll timing; either way the worker is replaced.
    config = _config("reward_fixtures:leaks", max_worker_memory_mb=256, max_masked_fraction=1.0)
    with RewardScorer(config, output_log=tmp_path / "log") as scorer:
        restarts = masked = 0.0
        for _ in range(8):
            result = scorer.score(["a"], [{"gold": "1"}])
            lost = result.metrics["reward/reward_fixtures:leaks/masked_memory"]
            assert result.rewards == ([None] if lost else [1.0])
            restarts += result.metrics["reward/worker_restarts"]
            masked += lost
    assert restarts >= 1.0  # 8 x 64 MiB = 512 MiB would have been kept without a restart
    assert masked <= restarts  # every masked sample cost its worker
    assert masked < 8


def test_a_worker_above_the_limit_during_a_call_is_killed_and_the_sample_masked(tmp_path: Path) -> None:
    config = _config("reward_fixtures:balloons", max_worker_memory_mb=128, max_masked_fraction=1.0)
    rows = [{"gold": "1"}, {"gold": "2", "balloon": 400}, {"gold": "3"}]
    with RewardScorer(config, output_log=tmp_path / "log") as scorer:
        result = scorer.score(["a", "b", "c"], rows)
    # the batch call is killed, its samples retried one by one: only the ballooning one is masked
    assert result.rewards == [1.0, None, 1.0]
    assert result.mask_reasons["reward_fixtures:balloons"] == [None, "memory", None]
    assert result.metrics["reward/reward_fixtures:balloons/masked_memory"] == 1.0
    assert result.metrics["reward/worker_restarts"] == 2.0  # the batch call's worker, then the sample's


def test_printed_output_is_capped_and_kept_in_the_run_dir(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "run" / "reward_output.log"
    config = _config("reward_fixtures:chatty", output_tail_kib=16)
    with RewardScorer(config, output_log=log) as scorer:
        for _ in range(2):
            result = scorer.score(["a"], [{"gold": "1"}])
            assert result.rewards == [1.0]
            # 10 MiB of lines through Python plus one 43-byte line through fd 2
            assert result.metrics["reward/printed_bytes"] == 10 * 2**20 + 43
    out, err = capfd.readouterr()
    assert "xxxx" not in out + err  # nothing of the 20 MiB reached the console
    assert f"go to {log}" in err and len(err.strip().splitlines()) == 1  # one notice
    text = log.read_text()
    assert text.count("printed 10485803 bytes (last 16384 bytes)") == 2
    assert text.count("native stderr line, the last thing printed") == 2
    assert len(text) < 2 * (16384 + 200)
