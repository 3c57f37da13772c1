"""The step loop's schedule with max_staleness = k, on real Ray with stand-in workers and learner.

The stand-ins sleep instead of running vLLM or PEFT and record when they ran and under which policy
version: these tests are about what the loop sends when (staleness bound, evaluation pinned to its
version, draining at the end, abandoning on a learner death). The same loop with the real
components is tested in test_async_rollouts.py.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cluster.checkpoint import TrainerState
from cluster.config import RunConfig, load_config
from cluster.data.prompts import Prompt, PromptSet
from cluster.policy_sync import full_sync
from cluster.recovery import PoolSizeRequests
from cluster.rollout_pool import RolloutPool
from cluster.step_loop import StepLoop
from grpo_ray.records import Batch, Completion, Group, SyncAck
from learner.data_parallel import PendingTrainStep
from rewards.config import CORRECTNESS_LABEL

pytestmark = pytest.mark.integration

import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROOT = Path(__file__).resolve().parents[2]
PROMPTS_PER_STEP = 8
GROUP = 2


class StandInWorker:
    """Completions whose text is the policy version that sampled them; logs (start, end, version, greedy)."""

    def __init__(
        self, index: int, delay: float, die_on_call: int | None = None, mislabel_on_call: int | None = None
    ) -> None:
        self.index, self.delay, self.version, self.die_on_call = index, delay, -1, die_on_call
        self.mislabel_on_call = mislabel_on_call
        self.calls: list[tuple[float, float, int, bool]] = []

    def info(self) -> dict[str, Any]:
        return {"index": self.index}

    def generate(
        self, prompts: list[tuple[int, list[int]]], group_size: int, seeds: list[int] | None, greedy: bool
    ) -> list[Group]:
        if len(self.calls) + 1 == self.die_on_call:
            os._exit(1)  # as abrupt as SIGKILL
        start = time.time()
        time.sleep(self.delay * len(prompts))
        self.calls.append((start, time.time(), self.version, greedy))
        version = -100 if len(self.calls) == self.mislabel_on_call else self.version
        return [
            Group(
                prompt_index=row,
                prompt_token_ids=ids,
                completions=[Completion([1], [0.0], "stop", f"v{self.version}") for _ in range(group_size)],
                policy_version=version,
                worker=self.index,
            )
            for row, ids in prompts
        ]

    def load(self, update: tuple[int, str]) -> SyncAck:
        self.version = update[0]
        return SyncAck(worker=self.index, version=update[0], checksum=update[1], seconds=0.0)

    def log(self) -> list[tuple[float, float, int, bool]]:
        return self.calls


class StandInLearner:
    """Trains by sleeping `train_s`; dies (os._exit) on update `die_on` when given."""

    def __init__(self, train_s: float, die_on: int | None = None) -> None:
        self.train_s, self.die_on, self.version = train_s, die_on, 0
        self.updates: list[tuple[float, float, list[int]]] = []  # (start, end, group versions)

    def train_step(self, batch: Batch) -> dict[str, float]:
        if self.version + 1 == self.die_on:
            os._exit(1)
        start = time.time()
        time.sleep(self.train_s)
        self.version += 1
        self.updates.append((start, time.time(), [g.policy_version for g in batch.groups]))
        return {"train/loss": 0.0}

    def export(self) -> tuple[tuple[int, str], tuple[int, str, None]]:
        return (self.version, "xxh"), (self.version, "xxh", None)

    def log(self) -> list[tuple[float, float, list[int]]]:
        return self.updates


class StandInLearnerGroup:
    """The LearnerHandle verbs the step loop uses, over one StandInLearner actor."""

    def __init__(self, train_s: float, die_on: int | None = None) -> None:
        import ray

        self.actor = ray.remote(num_cpus=0)(StandInLearner).remote(train_s, die_on)

    def start_train_step(self, batch: Batch) -> PendingTrainStep:
        return PendingTrainStep([self.actor.train_step.remote(batch)], None)

    def export_for_sync(self, kind: str, include_base: bool, check_every: int = 0, final: int = -1) -> Any:
        return self.actor.export.options(num_returns=2).remote()

    def checkpoint_state(self) -> dict[str, Any]:
        import torch

        return {
            "adapter": {"w": torch.zeros(1)},
            "adapter_config": {},
            "optimizer": {},
            "scheduler": {},
            "torch_rng": torch.get_rng_state(),
        }


class StandInSlots:
    """cluster.placement.WorkerSlots over stand-in workers; slot 0's first actor dies on `die_on_call`
    and mislabels the groups of `mislabel_on_call` as sampled by policy -100."""

    def __init__(self, delay: float, die_on_call: int | None, mislabel_on_call: int | None = None) -> None:
        import ray

        self.actor_class = ray.remote(num_cpus=0)(StandInWorker)
        self.delay, self.die_on_call, self.mislabel_on_call, self.started = (
            delay,
            die_on_call,
            mislabel_on_call,
            0,
        )

    def start(self, slot: int) -> Any:
        self.started += 1
        first = (slot, self.started) == (0, 1)
        die, mislabel = (self.die_on_call, self.mislabel_on_call) if first else (None, None)
        return self.actor_class.remote(slot, self.delay, die, mislabel)

    def release(self, slot: int, actor: Any) -> None:
        import ray

        ray.kill(actor)

    def node(self, slot: int) -> str:
        return "node"

    def stop(self) -> None:
        pass


@dataclass
class StandInScorer:
    calls: list[list[str]] = field(default_factory=list)

    def score(self, texts: list[str], rows: list[dict], only: list[str] | None = None) -> Any:
        self.calls.append(texts)

        @dataclass
        class Scored:
            rewards: list[float | None]
            per_term: dict[str, list[float | None]]
            metrics: dict[str, float]

        values: list[float | None] = [float(i % 2) for i in range(len(texts))]
        return Scored(values, {CORRECTNESS_LABEL: values}, {})


@dataclass
class Sink:
    logged: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.logged.append((step, values))


@dataclass
class Session:
    cfg: RunConfig
    learner: Any
    pool: RolloutPool
    scorer: StandInScorer
    sink: Sink
    held_out: list[Prompt]
    echo: Any
    pool_size: PoolSizeRequests
    progress: Any = lambda step, values: None
    config_yaml: str = ""
    clock: Any = None


def _session(
    tmp_path: Path,
    *overrides: str,
    workers: int = 2,
    gen_s: float = 0.005,
    train_s: float = 0.1,
    slots: StandInSlots | None = None,
    **learner: Any,
) -> Session:
    import ray

    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [
            f"run_root={tmp_path}",
            "name=schedule",
            f"prompts_per_step={PROMPTS_PER_STEP}",
            f"group_size={GROUP}",
            "learner.micro_batch_size=16",
            "rollout.prompts_per_chunk=2",
            *overrides,
        ],
    )
    cfg.run_dir.mkdir(parents=True)
    if slots is None:
        actor = ray.remote(num_cpus=0)(StandInWorker)
        handles = [actor.remote(i, gen_s) for i in range(workers)]
    else:
        handles = [slots.start(i) for i in range(workers)]
    pool = RolloutPool(
        handles, ["node"] * workers, slots, prompts_per_chunk=2, max_restarts=2, echo=lambda *_: None
    )
    pool.sync(ray.put((0, "xxh")), 0, "xxh")
    held_out = [Prompt(index=9000 + i, token_ids=[i], row={"gold": "1"}) for i in range(4)]
    learner_group = StandInLearnerGroup(train_s, **learner)
    pool.full_sync = full_sync(cfg, learner_group, pool)  # type: ignore[arg-type]
    return Session(
        cfg,
        learner_group,
        pool,
        StandInScorer(),
        Sink(),
        held_out,
        print,
        PoolSizeRequests(cfg, lambda *_: None),
    )


def _train_set() -> PromptSet:
    prompts = [Prompt(index=i, token_ids=[i], row={"gold": "1"}) for i in range(200)]
    return PromptSet(prompts=prompts, source="stand-in", dropped_too_long=0, skipped_bad_rows=0)


def _run(session: Session, eval_first: bool = False) -> tuple[TrainerState, int]:
    state = TrainerState(step=0, version=0, cursor=0, accuracy_before=None)
    return StepLoop(session, _train_set(), state, 0).run(eval_first=eval_first)


def _steps(session: Session) -> dict[int, dict[str, float]]:
    return {step: values for step, values in session.sink.logged if "train/loss" in values}


def _logs(session: Session) -> tuple[list[Any], list[Any]]:
    import ray

    workers = [call for w in session.pool.workers for call in ray.get(w.log.remote())]
    return workers, ray.get(session.learner.actor.log.remote())


def test_staleness_zero_samples_each_step_with_the_newest_policy_and_never_overlaps(
    tmp_path: Path, ray_session: list[str]
) -> None:
    session = _session(tmp_path, "steps=5", "max_staleness=0")
    state, version = _run(session)
    assert (state.step, version) == (5, 5)
    steps = _steps(session)
    assert sorted(steps) == [1, 2, 3, 4, 5]
    assert all(steps[s]["async/staleness_max"] == 0 for s in steps)
    calls, updates = _logs(session)
    for start, end, versions in updates:  # step s trained on groups of policy s - 1 only
        assert set(versions) == {updates.index((start, end, versions))}
        # no training generate call ran while the learner trained: the synchronous loop
        assert not [c for c in calls if not c[3] and c[0] < end and c[1] > start]


@pytest.mark.parametrize("k", [1, 2])
def test_staleness_k_runs_ahead_but_never_trains_older_groups(
    tmp_path: Path, ray_session: list[str], k: int
) -> None:
    session = _session(tmp_path, "steps=8", f"max_staleness={k}", train_s=0.15)
    _run(session)
    steps = _steps(session)
    assert sorted(steps) == list(range(1, 9))
    _, updates = _logs(session)
    for step, (_, _, versions) in enumerate(updates, start=1):
        learner_version = step - 1
        assert all(learner_version - v <= k for v in versions), (step, versions)
        assert steps[step]["async/staleness_max"] == max(learner_version - v for v in versions)
    # generation is 30x faster than training here: the pool runs the full k steps ahead
    assert max(s["async/staleness_max"] for s in steps.values()) == k
    assert all(s["async/dropped_stale"] == 0 for s in steps.values())  # never produced
    late = [steps[s]["time/learner_wait"] for s in range(k + 2, 9)]
    assert max(late) < 0.1, late  # the learner never waits for data once the pipeline is full


def test_a_group_older_than_the_bound_is_dropped_and_resampled(
    tmp_path: Path, ray_session: list[str]
) -> None:
    # The loop never samples one (see above); worker 0 mislabels its 3rd chunk as policy -100 to
    # exercise the safety net: the two groups are dropped, counted and resampled with their seeds.
    slots = StandInSlots(delay=0.005, die_on_call=None, mislabel_on_call=3)
    session = _session(tmp_path, "steps=6", "max_staleness=1", train_s=0.1, slots=slots)
    _run(session)
    steps = _steps(session)
    assert sorted(steps) == list(range(1, 7))
    assert sum(s["async/dropped_stale"] for s in steps.values()) == 2
    _, updates = _logs(session)
    for step, (_, _, versions) in enumerate(updates, start=1):
        assert len(versions) == PROMPTS_PER_STEP and all(step - 1 - v <= 1 for v in versions), (
            step,
            versions,
        )


def test_evaluation_runs_on_exactly_the_policy_it_was_queued_for(
    tmp_path: Path, ray_session: list[str]
) -> None:
    session = _session(tmp_path, "steps=6", "max_staleness=1", "eval_every=2", train_s=0.1)
    state, _ = _run(session, eval_first=True)
    assert state.accuracy_before is not None
    greedy = [texts for texts in session.scorer.calls if len(texts) == len(session.held_out)]
    assert [set(texts) for texts in greedy] == [{"v0"}, {"v2"}, {"v4"}]  # step 0, 2, 4 (6: the driver's)
    logged = [step for step, values in session.sink.logged]
    assert logged == sorted(logged)  # in step order, each eval with its step
    assert [s for s, v in session.sink.logged if "eval/accuracy" in v] == [0, 2, 4]
    calls, _ = _logs(session)
    assert all(c[2] in (0, 2, 4) for c in calls if c[3])


def test_last_step_drains_the_pipeline(tmp_path: Path, ray_session: list[str]) -> None:
    session = _session(tmp_path, "steps=4", "max_staleness=2", train_s=0.1)
    _run(session)
    pool = session.pool
    assert not pool.busy and pool.queue.waiting == 0
    calls, updates = _logs(session)
    chunks_per_step = PROMPTS_PER_STEP // 2
    assert len([c for c in calls if not c[3]]) == 4 * chunks_per_step  # nothing sampled past the last step
    assert all(pool.last_acks[slot].version == 4 for slot in pool.active)
    assert len(updates) == 4


def test_a_dead_learner_empties_the_pipeline_before_the_error_surfaces(
    tmp_path: Path, ray_session: list[str]
) -> None:
    import ray

    session = _session(tmp_path, "steps=6", "max_staleness=2", train_s=0.05, die_on=3)
    with pytest.raises(ray.exceptions.RayActorError):
        _run(session)
    assert not session.pool.busy and session.pool.queue.waiting == 0
    assert max(step for step, _ in session.sink.logged) <= 2


def test_a_worker_killed_while_sampling_ahead_is_restarted_and_no_group_is_lost(
    tmp_path: Path, ray_session: list[str]
) -> None:
    slots = StandInSlots(delay=0.005, die_on_call=3)
    session = _session(tmp_path, "steps=6", "max_staleness=1", train_s=0.1, slots=slots)
    _run(session)
    steps = _steps(session)
    assert sorted(steps) == list(range(1, 7))
    assert sum(s["pool/restarts"] for s in steps.values()) == 1
    assert sum(s["pool/requeued_prompts"] for s in steps.values()) == 2  # its chunk, resampled once
    _, updates = _logs(session)
    for step, (_, _, versions) in enumerate(updates, start=1):
        assert len(versions) == PROMPTS_PER_STEP and all(step - 1 - v <= 1 for v in versions), (
            step,
            versions,
        )
