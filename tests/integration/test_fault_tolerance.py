"""What a run survives, with the real components: a SIGKILLed rollout worker, a SIGKILLed learner,
and a rollout pool grown and shrunk while the run goes on. Every run is compared with one
uninterrupted fixed-pool run of the same config.

Processes are found through Ray (named actors, `os.getpid()` run on the actor), never by name.

Tolerances: rewards must be identical. vLLM samples every prompt slot with its own seed, chunk
boundaries are fixed by rollout.prompts_per_chunk, and every worker (restarted or added) runs the
learner's exact policy after a full sync, so the same tokens are sampled whichever worker ran a
chunk. Losses may differ only by float summation order (same machine, same threads): 1e-6, as in
test_resume. The sampler/learner logprob gap bound is test_grpo_loop's (2e-4, its error model there).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cluster.cli import main as cli_main
from cluster.config import RunConfig, load_config
from cluster.driver import run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
LOSS_TOLERANCE = 1e-6
LOGPROB_TOLERANCE = 2e-4
ELASTIC_STEPS = 10  # grow seen at step <= 3, join <= 4, shrink seen <= 7, one-worker steps after it
GROUPS_PER_STEP = 16  # configs/demo.yaml prompts_per_step


def _cfg(run_root: Path, name: str, *extra: str) -> RunConfig:
    return load_config(
        ROOT / "configs" / "demo.yaml",
        [
            f"run_root={run_root}",
            f"name={name}",
            "checkpoint_every=2",
            "keep_checkpoints=50",
            "data.eval_files=[]",
            "logging.progress_bar=false",
            *extra,
        ],
    )


def _per_step(run_dir: Path) -> dict[int, dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    trained = [r for r in rows if "train/loss" in r]
    assert len({r["step"] for r in trained}) == len(trained), "a step was logged twice"
    return {r["step"]: r for r in trained}


def _wait_for(condition: Callable[[], Any], what: str, timeout: float = 600) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return value


def _named_actor(run_name: str, suffix: str) -> Any:
    import ray

    def find() -> str | None:
        names = [
            n for n in ray.util.list_named_actors() if n.startswith(f"{run_name}.") and n.endswith(suffix)
        ]
        return names[0] if names else None

    return ray.get_actor(_wait_for(find, f"actor {run_name}.*{suffix}"))


def _pid(actor: Any) -> int:
    import ray

    # Ray's own way to run a function on an actor: the pid of the process that really hosts it
    return int(ray.get(actor.__ray_call__.remote(lambda self: os.getpid())))


def _in_background(job: Callable[[], None]) -> Callable[[], None]:
    """Start `job` in a thread; the returned function joins it and re-raises what it raised."""
    errors: list[BaseException] = []

    def body() -> None:
        try:
            job()
        except BaseException as err:  # re-raised in the test's thread by finish()
            errors.append(err)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()

    def finish() -> None:
        thread.join(timeout=60)
        if errors:
            raise errors[0]

    return finish


@pytest.fixture(scope="module")
def fixed_pool(tmp_path_factory: pytest.TempPathFactory, ray_session: list[str], tiny_model: Path) -> dict:
    """One uninterrupted run with a fixed pool of two workers: what every other run must reproduce."""
    cfg = _cfg(tmp_path_factory.mktemp("fixed"), "fixed", f"steps={ELASTIC_STEPS}")
    run(cfg, echo=lambda *_: None)
    return _per_step(cfg.run_dir)


def kill_learner_after_checkpoint(cfg: RunConfig, step: int) -> Callable[[], None]:
    """SIGKILL the run's learner process once checkpoint `step` is complete (in a thread); the
    returned function joins that thread and re-raises what it raised."""
    done = cfg.run_dir / "checkpoints" / f"step_{step:06d}" / "state.json"
    return kill_learner_when(cfg, done.exists, f"checkpoint {step}")


def kill_learner_when(cfg: RunConfig, condition: Callable[[], Any], what: str) -> Callable[[], None]:
    """SIGKILL the run's learner process as soon as `condition()` holds (see above)."""

    def kill() -> None:
        pid = _pid(_named_actor(cfg.name, ".learner"))
        _wait_for(condition, what)
        os.kill(pid, signal.SIGKILL)

    return _in_background(kill)


def _same_rewards(steps: dict[int, dict], reference: dict[int, dict], which: list[int]) -> None:
    for step in which:
        assert steps[step]["reward/mean"] == reference[step]["reward/mean"], step
        assert steps[step]["rollout/groups"] == GROUPS_PER_STEP, step


def test_sigkilled_worker_is_restarted_resynced_and_the_run_finishes(
    tmp_path: Path, fixed_pool: dict
) -> None:
    # One worker: the kill leaves none, so the step waits for the restart (the worst case).
    cfg = _cfg(tmp_path, "killworker", "steps=4", "rollout.num_workers=1")
    lines: list[str] = []

    def kill() -> None:
        pid = _pid(_named_actor(cfg.name, ".rollout-0.0"))
        _wait_for(lambda: 1 in _per_step(cfg.run_dir), "step 1")
        os.kill(pid, signal.SIGKILL)  # step 2 is generating now

    finish = _in_background(kill)
    result = run(cfg, echo=lines.append)
    finish()

    steps = _per_step(cfg.run_dir)
    assert sorted(steps) == [1, 2, 3, 4]
    assert sum(s["pool/restarts"] for s in steps.values()) == 1
    died = [line for line in lines if line.startswith("rollout worker 0 died at step")]
    assert len(died) == 1 and "restarting (1/3)" in died[0], lines
    assert any(line.startswith("rollout worker 0 joined at step") for line in lines), lines
    # the restarted actor acknowledged the learner's final policy
    assert [(ack.worker, ack.version) for ack in result.final_acks] == [(0, 4)]
    assert result.final_version == 4
    killed_at = int(died[0].split()[6])
    for step in range(killed_at, 5):  # sampled (partly) by the restarted engine after its full sync
        assert steps[step]["sync/logprob_gap_max"] < LOGPROB_TOLERANCE, steps[step]
    _same_rewards(steps, fixed_pool, [1, 2, 3, 4])  # no group lost, none generated twice


def test_sigkilled_learner_restarts_from_checkpoint_and_redoes_steps_exactly(
    tmp_path: Path, fixed_pool: dict
) -> None:
    cfg = _cfg(tmp_path, "killlearner", "steps=4")
    lines: list[str] = []
    finish = kill_learner_after_checkpoint(cfg, 2)
    result = run(cfg, echo=lines.append)
    finish()

    assert any(
        line.startswith("learner died at step 3") and "restarting it from checkpoint step_000002" in line
        for line in lines
    ), lines
    steps = _per_step(cfg.run_dir)
    assert sorted(steps) == [1, 2, 3, 4]  # steps 3.. were redone and logged once
    _same_rewards(steps, fixed_pool, [1, 2, 3, 4])
    for step in (3, 4):
        assert abs(steps[step]["train/loss"] - fixed_pool[step]["train/loss"]) <= LOSS_TOLERANCE, step
        assert steps[step]["policy_version"] == step
    assert sorted((ack.worker, ack.version) for ack in result.final_acks) == [(0, 4), (1, 4)]


def test_pool_grows_and_shrinks_during_a_run_with_fixed_pool_results(
    tmp_path: Path, fixed_pool: dict
) -> None:
    cfg = _cfg(tmp_path, "elastic", f"steps={ELASTIC_STEPS}", "rollout.num_workers=1")
    lines: list[str] = []

    def echo(line: str) -> None:
        lines.append(line)
        if line.startswith("rollout pool grows to 2"):
            # Pacing only: the driver prints this right after starting the new engine in the
            # background; holding the line until that engine is up makes its join land at the
            # next step boundary, whatever this machine's load (an engine starts in 10-60 s here,
            # a demo step takes 0.3-15 s). The join itself runs the real path: ready -> full sync -> work.
            _pid(_named_actor(cfg.name, ".rollout-1.0"))

    def scale() -> None:
        _wait_for(lambda: 1 in _per_step(cfg.run_dir), "step 1")
        assert cli_main(["scale", str(cfg.run_dir), "2"]) == 0
        _wait_for(
            lambda: any(s.get("pool/workers") == 2 for s in _per_step(cfg.run_dir).values()),
            "the second worker",
        )
        assert cli_main(["scale", str(cfg.run_dir), "1"]) == 0

    finish = _in_background(scale)
    run(cfg, echo=echo)
    finish()

    steps = _per_step(cfg.run_dir)
    workers = [int(steps[s]["pool/workers"]) for s in sorted(steps)]
    grown = workers.index(2)
    assert workers[0] == 1 and 1 in workers[grown:], workers
    assert any(line.startswith("rollout pool grows to 2") for line in lines), lines
    assert any(line.startswith("rollout worker 1 joined at step") for line in lines), lines
    assert any(line.startswith("rollout pool shrinks to 1") for line in lines), lines
    _same_rewards(steps, fixed_pool, list(range(1, ELASTIC_STEPS + 1)))
