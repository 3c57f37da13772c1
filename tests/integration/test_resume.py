"""Exact resume: a 6-step run killed (SIGKILL) after step 3 and resumed matches an uninterrupted run.

Tolerance: rewards must be identical (same sampled tokens: vLLM samples with per-prompt seeds, the
resumed learner restores adapter, AdamW state and scheduler exactly, and the first sync rebuilds the
engines' weights from them). Bit-identity is a legitimate claim here: both runs are on the SAME
machine, so the same kernels sum the same shapes in the same order (torch's 64-byte-aligned buffers
give MKL no alignment-dependent path); nothing here is compared across machines, which is why this
test is not marked `numeric` (a second pass under other kernels re-checks the same claim, for minutes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bounds import within

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
# Same machine, kernels, shapes and threads: the losses are expected bit for bit; 1e-6 (8 ulp of an
# O(1) loss) is slack for a last reduction split differently between two threads, far below a real
# divergence (one changed token moves the loss by ~1e-2).
LOSS_TOLERANCE = 1e-6


def _command(run_root: Path, name: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cluster.cli",
        "train",
        str(ROOT / "configs" / "demo.yaml"),
        "steps=6",
        "checkpoint_every=1",
        "keep_checkpoints=2",
        "data.eval_files=[]",
        "logging.progress_bar=false",
        f"run_root={run_root}",
        f"name={name}",
        *extra,
    ]


def _own_ray_env() -> dict[str, str]:
    # Each run starts its own local Ray: never join the session's test cluster through RAY_ADDRESS.
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}


def _per_step(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return {r["step"]: r for r in rows if "train/loss" in r}


def test_killed_run_resumes_exactly(tmp_path: Path, tiny_model: Path) -> None:
    straight = subprocess.run(
        _command(tmp_path, "straight"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=_own_ray_env(),
    )
    assert straight.returncode == 0, straight.stderr[-3000:]

    # start_new_session: the run's local Ray (raylet, GCS, actors) lives in its process group, so one
    # SIGKILL to the group kills all of it, as a crash or a pre-empted node would.
    killed_dir = tmp_path / "killed"
    victim = subprocess.Popen(
        _command(tmp_path, "killed"),
        cwd=ROOT,
        start_new_session=True,
        env=_own_ray_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    while not (killed_dir / "checkpoints" / "step_000003" / "state.json").exists():
        assert victim.poll() is None, "the run ended before step 3"
        assert time.monotonic() < deadline, "no step-3 checkpoint within 10 minutes"
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=60)
    # a checkpoint write cut short by a crash leaves a .partial directory; resume must skip it
    (killed_dir / "checkpoints" / "step_000009.crash.partial").mkdir()

    resumed = subprocess.run(
        [*_command(tmp_path, "killed"), "resume=auto"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=_own_ray_env(),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "ignoring incomplete checkpoint" in resumed.stdout
    assert "resumed from" in resumed.stdout

    straight, again = _per_step(tmp_path / "straight"), _per_step(killed_dir)
    assert sorted(again) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert again[step]["reward/mean"] == straight[step]["reward/mean"], step
        within(
            f"step {step} resumed vs straight loss",
            abs(again[step]["train/loss"] - straight[step]["train/loss"]),
            LOSS_TOLERANCE,
        )
        assert again[step]["policy_version"] == step
