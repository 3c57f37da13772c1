"""A step's groups do not depend on the number of rollout workers: each prompt slot keeps its seed.

Real Ray (the session's two-node cluster), real RolloutPool; the workers are small stand-in actors,
not vLLM engines: this test is about how the pool deals prompts and seeds, and a stand-in makes each
completion's text the seed vLLM would give that sample (a request seeded s samples with s .. s+n-1),
so equal groups mean equal samples.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

from cluster.data.prompts import Prompt
from cluster.rollout_pool import RolloutPool
from grpo_ray.records import Completion, Group
from grpo_ray.seeds import prompt_seeds

pytestmark = pytest.mark.integration

PROMPTS, GROUP = 7, 3  # 7 does not divide by 2 or 3: the workers get uneven slices


class SeedEcho:
    """Stands in for RolloutWorker.generate: completion j of a prompt seeded s reads str(s + j)."""

    def __init__(self, index: int) -> None:
        self.index = index

    def generate(
        self, prompts: list[tuple[int, list[int]]], group_size: int, seeds: list[int] | None, greedy: bool
    ) -> list[Group]:
        assert seeds is not None and len(seeds) == len(prompts)
        return [
            Group(
                prompt_index=row,
                prompt_token_ids=ids,
                completions=[Completion([j], [0.0], "length", str(seed + j)) for j in range(group_size)],
                policy_version=0,
                worker=self.index,
            )
            for (row, ids), seed in zip(prompts, seeds, strict=True)
        ]


def _step_groups(workers: int, step: int) -> list[tuple[int, list[str]]]:
    import ray
    from ray import cloudpickle

    # This test module is not importable in Ray's workers: ship the stand-in class by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    actors: list[Any] = [ray.remote(num_cpus=0)(SeedEcho).remote(i) for i in range(workers)]
    try:
        pool = RolloutPool(actors, nodes=[""] * workers)
        prompts = [Prompt(index=100 + k, token_ids=[k], row={"gold": "0"}) for k in range(PROMPTS)]
        groups = pool.generate(prompts, GROUP, seeds=prompt_seeds(0, step, PROMPTS, GROUP))
        assert {g.worker for g in groups} == set(range(workers)), "every worker took a share"
        return [(g.prompt_index, [c.text for c in g.completions]) for g in groups]
    finally:
        for actor in actors:
            ray.kill(actor)


def test_groups_do_not_depend_on_the_number_of_workers(ray_session: list[str]) -> None:
    one, two, three = (_step_groups(n, step=4) for n in (1, 2, 3))
    assert one == two == three
    assert [index for index, _ in one] == [100 + k for k in range(PROMPTS)]  # prompt order kept
    assert len({text for _, texts in one for text in texts}) == PROMPTS * GROUP  # every sample its own seed
    assert _step_groups(2, step=5) != two  # the step enters the seeds
