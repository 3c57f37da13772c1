"""The warm pool, through the real CLI: `grpo-ray warm up`, then runs that start from its spares.

One pool (the demo config's two engines and learner) serves the module; each test waits until it
is idle with every spare built. The pool has its own cache directory (its state file), sharing the
session's prompt-token cache, so no other test can see it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLI = [sys.executable, "-m", "cluster.cli"]
ADOPTED = "warm pool: this run starts from its 2 rollout worker(s) and learner"
# Exactly equal between a warm and a cold run: both are fresh processes built from the same
# arguments on this machine, running the same kernels with the same thread counts, so every float
# is computed in the same order (the exact-resume tests rest on the same fact). Timings are not.
SAME = (
    "reward/mean",
    "reward/std",
    "rollout/accuracy",
    "train/loss",
    "train/grad_norm",
    "sync/logprob_gap_max",
    "eval/accuracy",
)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    cache = tmp_path_factory.mktemp("warm-cache")
    tokens = Path(os.environ["GRPO_RAY_CACHE_DIR"]) / "prompt-tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    (cache / "prompt-tokens").symlink_to(tokens)
    env = {**os.environ, "GRPO_RAY_CACHE_DIR": str(cache)}
    up = subprocess.run([*CLI, "warm", "up", "demo"], env=env, capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "warm pool ready in" in up.stdout
    yield env
    down = subprocess.run([*CLI, "warm", "down"], env=env, capture_output=True, text=True, timeout=60)
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
    assert not (cache / "warm-pool" / "state.json").exists()


def _state(env: dict[str, str]) -> dict:  # type: ignore[type-arg]
    return json.loads((Path(env["GRPO_RAY_CACHE_DIR"]) / "warm-pool" / "state.json").read_text())


def _idle_and_built(env: dict[str, str], timeout_s: float = 180.0) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = _state(env)
        if not state["in_use"] and state["ready"] == state["spares"]:
            return state
        time.sleep(0.5)
    raise AssertionError(f"the pool did not refill in {timeout_s:.0f} s: {_state(env)}")


def _train(env: dict[str, str], run_root: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    args = [*CLI, "train", "demo", f"run_root={run_root}", "logging.progress_bar=false", *overrides]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _metrics(run_dir: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_starts_from_the_spares_and_trains_exactly_as_a_cold_run(
    pool: dict[str, str], tmp_path: Path
) -> None:
    claims = _idle_and_built(pool)["claims"]
    warm = _train(pool, tmp_path, "steps=2", "name=warm")
    assert ADOPTED in warm.stdout
    phases = json.loads((tmp_path / "warm" / "startup.json").read_text())["phases"]
    assert {p["where"] for p in phases} >= {
        "engine-0 (warm pool)",
        "engine-1 (warm pool)",
        "learner (warm pool)",
    }
    # Every spare finished building before the run began: none of their phases is on its clock.
    assert all(p["end_s"] < 0 for p in phases if "(warm pool)" in p["where"])
    cold = _train(pool, tmp_path, "steps=2", "name=cold", "warm_pool=false")
    assert "warm pool" not in cold.stdout
    assert _idle_and_built(pool)["claims"] == claims + 1  # the cold run took nothing from the pool
    for step, (a, b) in enumerate(zip(_metrics(tmp_path / "warm"), _metrics(tmp_path / "cold"), strict=True)):
        assert {k: a.get(k) for k in SAME} == {k: b.get(k) for k in SAME}, f"step {step}"


def test_a_run_the_spares_do_not_fit_starts_cold_and_says_why(pool: dict[str, str], tmp_path: Path) -> None:
    claims = _idle_and_built(pool)["claims"]
    done = _train(pool, tmp_path, "steps=1", "rollout.num_workers=1")
    assert (
        "warm pool of 'demo' not used: it holds rollout-0, rollout-1, learner; this run starts "
        "rollout-0, learner; starting cold"
    ) in done.stdout
    state = _idle_and_built(pool)
    assert state["claims"] == claims and state["ready"] == 3  # untouched, still serving the demo


def test_a_killed_run_gives_its_spares_back_and_the_pool_refills(
    pool: dict[str, str], tmp_path: Path
) -> None:
    before = _idle_and_built(pool)
    args = [*CLI, "train", "demo", f"run_root={tmp_path}", "name=killed", "logging.progress_bar=false"]
    run = subprocess.Popen(args, env=pool, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while (
        not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2) and time.monotonic() < deadline
    ):
        assert run.poll() is None, run.stdout.read() if run.stdout else ""
        time.sleep(0.2)
    assert _state(pool)["in_use"]
    # Stopping the pool now would end the run: refused, and the run goes on.
    down = subprocess.run([*CLI, "warm", "down"], env=pool, capture_output=True, text=True, timeout=60)
    assert down.returncode == 2 and "a run is using the warm pool of 'demo'" in down.stderr, down.stderr
    assert run.poll() is None
    os.kill(run.pid, signal.SIGKILL)  # no clean-up at all: the spares are detached, only the pool frees them
    run.wait()
    assert run.stdout is not None and ADOPTED in run.stdout.read()
    after = _idle_and_built(pool)
    assert after["claims"] == before["claims"] + 1
    # The killed run's actors are gone, not left holding the machine: only the new spares are named.
    names = _in_pool(
        pool,
        after["address"],
        "names = sorted(a['name'] for a in ray.util.list_named_actors(all_namespaces=True))",
    )
    generation = {name.rsplit(".", 1)[1] for name in names if name.startswith("spare.")}
    assert len(names) == 4 and "spare-pool" in names and len(generation) == 1, names
    # An idle spare that dies (here the learner's) is replaced, not handed to the next run dead.
    learner = next(name for name in names if name.startswith("spare.learner."))
    _in_pool(
        pool, after["address"], f"ray.kill(ray.get_actor({learner!r}, namespace='grpo-ray-warm')); names = []"
    )
    assert ADOPTED in _train(pool, tmp_path, "steps=1", "name=next").stdout


def _in_pool(env: dict[str, str], address: str, code: str) -> list[str]:
    """Run `code` on a driver joined to the pool's Ray; it sets `names`, which is returned."""
    script = (
        "import sys, ray; from cluster.ray_session import connect_loopback; "
        f"connect_loopback(sys.argv[1]); {code}; print(repr(names))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, address], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return eval(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]
