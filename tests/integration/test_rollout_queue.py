"""The rollout pool's scheduling and worker-loss handling, on real Ray with fake workers.

The workers here are stand-ins (they sleep instead of running vLLM, and die by `os._exit` on a
chosen call): these tests are about who gets which chunk, what happens to a dead worker's chunk,
and when a restarted worker may take work. The real engine is killed in test_fault_tolerance.py.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import pytest

from cluster.data.prompts import Prompt
from cluster.rollout_pool import RolloutPool, RolloutPoolError
from grpo_ray.records import Completion, Group, SyncAck

pytestmark = pytest.mark.integration

# Ray workers cannot import a test module by name (tests/ is no package): ship its classes by value.
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class FakeWorker:
    """Generates one 'completion' per sample whose only token is its seed; sleeps `delay` per prompt."""

    def __init__(self, index: int, delay: float, die_on_call: int | None) -> None:
        self.index, self.delay, self.die_on_call = index, delay, die_on_call
        self.calls, self.version = 0, -1

    def info(self) -> dict[str, Any]:
        return {"index": self.index}

    def generate(
        self, prompts: list[tuple[int, list[int]]], group_size: int, seeds: list[int] | None, greedy: bool
    ) -> list[Group]:
        self.calls += 1
        if self.calls == self.die_on_call:
            os._exit(1)  # as abrupt as SIGKILL: no reply, the process is gone
        time.sleep(self.delay * len(prompts))
        assert seeds is not None
        return [
            Group(
                prompt_index=row,
                prompt_token_ids=ids,
                completions=[Completion([seed + k], [0.0], "stop", str(seed + k)) for k in range(group_size)],
                policy_version=self.version,
                worker=self.index,
            )
            for (row, ids), seed in zip(prompts, seeds, strict=True)
        ]

    def load(self, update: tuple[int, str]) -> SyncAck:
        self.version = update[0]
        return SyncAck(worker=self.index, version=update[0], checksum=update[1], seconds=0.0)


class FakeSlots:
    """The WorkerSlots interface over fake workers: per slot, a delay and which call each of its
    actors dies on (a list indexed by restart generation; missing: never dies)."""

    def __init__(self, delays: dict[int, float], deaths: dict[int, list[int | None]]) -> None:
        import ray

        self.actor_class = ray.remote(num_cpus=0)(FakeWorker)
        self.delays, self.deaths = delays, deaths
        self.generation: dict[int, int] = {}

    def start(self, slot: int) -> Any:
        generation = self.generation.get(slot, 0)
        self.generation[slot] = generation + 1
        plan = self.deaths.get(slot, [])
        die = plan[generation] if generation < len(plan) else None
        return self.actor_class.remote(slot, self.delays.get(slot, 0.01), die)

    def release(self, slot: int, actor: Any) -> None:
        import ray

        ray.kill(actor)

    def node(self, slot: int) -> str:
        return "fake-node"

    def stop(self) -> None:
        pass


def _pool(slots: FakeSlots, workers: int, chunk: int, max_restarts: int, lines: list[str]) -> RolloutPool:
    import ray

    pool = RolloutPool(
        [slots.start(i) for i in range(workers)],
        ["fake-node"] * workers,
        slots,
        prompts_per_chunk=chunk,
        max_restarts=max_restarts,
        restart_timeout_s=60,
        echo=lines.append,
    )
    version = {"now": 7}

    def full_sync(which: list[int]) -> list[SyncAck]:
        return pool.sync(ray.put((version["now"], "xxh")), version["now"], "xxh", which)

    pool.full_sync = full_sync
    assert len(pool.sync(ray.put((7, "xxh")), 7, "xxh")) == workers
    return pool


def _prompts(count: int) -> tuple[list[Prompt], list[int]]:
    prompts = [Prompt(index=1000 + i, token_ids=[i], row={}) for i in range(count)]
    return prompts, [100 * i for i in range(count)]


def _check_order(groups: list[Group], prompts: list[Prompt], seeds: list[int], group_size: int) -> None:
    # every prompt exactly once, in prompt order, sampled with its own slot's seeds
    assert [g.prompt_index for g in groups] == [p.index for p in prompts]
    assert [[c.token_ids[0] for c in g.completions] for g in groups] == [
        [s + k for k in range(group_size)] for s in seeds
    ]


def test_fast_worker_takes_more_chunks_and_order_is_kept(ray_session: list[str]) -> None:
    lines: list[str] = []
    pool = _pool(FakeSlots({0: 0.05, 1: 0.15}, {}), workers=2, chunk=1, max_restarts=0, lines=lines)
    prompts, seeds = _prompts(24)
    groups = pool.generate(prompts, 2, seeds)
    _check_order(groups, prompts, seeds, 2)
    # Worker 0 is 3x faster: in the ~0.9 s both are busy it finishes ~3 chunks per chunk of worker
    # 1, i.e. 18 of 24. Error model: +-1 chunk at each end of the window, and Ray's few-ms call
    # overhead (added to both service times) pulls the ratio towards 1: 15..20 covers both.
    assert 15 <= pool.chunks_by_slot[0] <= 20, pool.chunks_by_slot
    assert pool.chunks_by_slot[0] + pool.chunks_by_slot[1] == 24
    assert pool.take_metrics()["pool/workers"] == 2


def test_dead_worker_chunk_requeued_restarted_and_resynced_before_work(ray_session: list[str]) -> None:
    lines: list[str] = []
    # worker 1's first actor dies on its 2nd generate call; its restart never dies
    pool = _pool(FakeSlots({0: 0.02, 1: 0.02}, {1: [2]}), workers=2, chunk=2, max_restarts=3, lines=lines)
    pool.step = 5
    prompts, seeds = _prompts(12)
    groups = pool.generate(prompts, 3, seeds)
    _check_order(groups, prompts, seeds, 3)  # the lost chunk was generated once, by someone else
    assert all(g.policy_version == 7 for g in groups)
    metrics = pool.take_metrics()
    assert (metrics["pool/restarts"], metrics["pool/requeued_prompts"]) == (1, 2), metrics
    assert any(
        line.startswith("rollout worker 1 died at step 5 (node fake-node")
        and line.endswith("2 prompts re-queued, restarting (1/3)")
        for line in lines
    ), lines
    assert 1 in pool.joining and 1 not in pool.active  # mid-step, worker 0 was still there

    # at the next step boundary the restarted worker joins after a full sync of the current policy
    pool.step = 6
    assert pool.admit(block=True) == [1]
    assert pool.last_acks[1].version == 7
    groups = pool.generate(prompts, 3, seeds)
    _check_order(groups, prompts, seeds, 3)
    assert {g.worker for g in groups} == {0, 1}
    assert all(g.policy_version == 7 for g in groups)  # the restarted actor samples the synced policy
    pool.stop()


def test_lone_worker_restart_finishes_the_step(ray_session: list[str]) -> None:
    lines: list[str] = []
    pool = _pool(FakeSlots({0: 0.01}, {0: [2]}), workers=1, chunk=2, max_restarts=1, lines=lines)
    prompts, seeds = _prompts(8)
    groups = pool.generate(prompts, 2, seeds)  # blocks on the restart, syncs it, continues
    _check_order(groups, prompts, seeds, 2)
    assert all(g.policy_version == 7 for g in groups)
    assert pool.take_metrics()["pool/restarts"] == 1
    assert any("joined at step" in line for line in lines), lines
    pool.stop()


def test_crash_loop_is_dropped_and_an_empty_pool_stops(ray_session: list[str]) -> None:
    lines: list[str] = []
    # worker 1 dies on its first call every time; max_restarts 2: three deaths, then dropped
    pool = _pool(
        FakeSlots({0: 0.01, 1: 0.01}, {1: [1, 1, 1]}), workers=2, chunk=1, max_restarts=2, lines=lines
    )
    prompts, seeds = _prompts(6)
    groups = pool.generate(prompts, 2, seeds)
    _check_order(groups, prompts, seeds, 2)
    for _ in range(3):  # each restart joins at a boundary and dies on its first chunk
        if 1 in pool.joining:
            pool.admit(block=True)
        pool.generate(prompts, 2, seeds)
    assert 1 in pool.dropped and 1 not in pool.active and 1 not in pool.joining
    assert any(
        line.startswith("WARNING: rollout worker 1 died") and "dropped after 2 restart(s)" in line
        for line in lines
    )

    lines.clear()
    lone = _pool(FakeSlots({0: 0.01}, {0: [1, 1]}), workers=1, chunk=1, max_restarts=1, lines=lines)
    with pytest.raises(RolloutPoolError, match="no rollout worker is left"):
        lone.generate(prompts, 2, seeds)
    pool.stop()


def test_grow_and_shrink_at_step_boundaries(ray_session: list[str]) -> None:
    lines: list[str] = []
    pool = _pool(FakeSlots({}, {}), workers=1, chunk=1, max_restarts=0, lines=lines)
    prompts, seeds = _prompts(4)
    pool.resize(3)
    assert sorted(pool.joining) == [1, 2] and pool.size == 3
    while pool.joining:
        pool.admit(block=True)
    assert sorted(pool.active) == [0, 1, 2] and all(pool.last_acks[s].version == 7 for s in (1, 2))
    _check_order(pool.generate(prompts, 2, seeds), prompts, seeds, 2)
    assert pool.take_metrics()["pool/workers"] == 3
    pool.resize(1)
    assert sorted(pool.active) == [0]
    _check_order(pool.generate(prompts, 2, seeds), prompts, seeds, 2)
    assert pool.take_metrics()["pool/workers"] == 1
    pool.stop()
