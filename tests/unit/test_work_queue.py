"""The rollout pool's work queue on its own: fixed chunks, requeue at the front, prompt order, no duplicates."""

from __future__ import annotations

import pytest

from cluster.rollout_queue import WorkQueue
from grpo_ray.records import Completion, Group


def _groups(chunk_prompts: list[tuple[int, list[int]]]) -> list[Group]:
    return [Group(row, ids, [Completion([1], [0.0], "stop", "x")], 0, 0) for row, ids in chunk_prompts]


def test_chunks_are_fixed_slot_ranges_with_their_seeds() -> None:
    queue = WorkQueue()
    key = queue.add(
        [(10 + i, [i]) for i in range(7)], [100 + i for i in range(7)], group_size=4, prompts_per_chunk=3
    )
    chunks = [queue.take() for _ in range(3)]
    assert queue.take() is None
    # 7 prompts in chunks of 3: slots [0,3), [3,6), [6,7); each chunk carries its own slots' seeds
    assert [[row for row, _ in c.prompts] for c in chunks if c] == [[10, 11, 12], [13, 14, 15], [16]]
    assert [c.seeds for c in chunks if c] == [[100, 101, 102], [103, 104, 105], [106]]
    assert all(c is not None and c.key == key and c.group_size == 4 for c in chunks)


def test_requeued_chunk_goes_first_and_results_keep_prompt_order() -> None:
    queue = WorkQueue()
    key = queue.add([(i, [i]) for i in range(6)], None, group_size=2, prompts_per_chunk=2)
    first, second, third = queue.take(), queue.take(), queue.take()
    assert first and second and third
    queue.finish(third, _groups(third.prompts))  # finishes out of order
    queue.requeue(first)  # its worker died
    assert queue.take() is first
    queue.finish(first, _groups(first.prompts))
    assert not queue.complete(key)
    with pytest.raises(RuntimeError, match="outstanding"):
        queue.results(key)
    queue.finish(second, _groups(second.prompts))
    assert [g.prompt_index for g in queue.results(key)] == [0, 1, 2, 3, 4, 5]


def test_a_chunk_finished_twice_or_short_is_an_error() -> None:
    queue = WorkQueue()
    queue.add([(i, [i]) for i in range(2)], None, group_size=2, prompts_per_chunk=2)
    chunk = queue.take()
    assert chunk
    with pytest.raises(RuntimeError, match="1 groups for 2 prompts"):
        queue.finish(chunk, _groups(chunk.prompts[:1]))
    queue.finish(chunk, _groups(chunk.prompts))
    with pytest.raises(RuntimeError, match="generated twice"):
        queue.finish(chunk, _groups(chunk.prompts))
    with pytest.raises(ValueError, match="one seed per prompt slot"):
        queue.add([(0, [0])], [1, 2], group_size=2, prompts_per_chunk=1)
