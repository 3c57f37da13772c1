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


def test_pinned_chunks_go_only_where_eligible_and_front_requests_jump_the_queue() -> None:
    queue = WorkQueue()
    later = queue.add([(i, [i]) for i in range(2)], None, group_size=2, prompts_per_chunk=1)
    pinned = queue.add([(9, [9])], None, group_size=1, prompts_per_chunk=1, greedy=True, policy_version=3)
    first = queue.add([(5, [5])], [50], group_size=2, prompts_per_chunk=1, front=True)
    assert queue.pinned_waiting(below=4) and not queue.pinned_waiting(below=3)
    chunk = queue.take()
    assert chunk is not None and chunk.key == first  # resampled prompts go ahead of everything
    # a worker holding v2 may not take the chunk pinned to v3: it gets the next unpinned one
    chunk = queue.take(lambda c: c.policy_version is None or c.policy_version == 2)
    assert chunk is not None and chunk.key == later and chunk.policy_version is None
    chunk = queue.take(lambda c: c.policy_version == 3)
    assert chunk is not None and chunk.key == pinned and not queue.pinned_waiting(below=4)


def test_a_cancelled_request_leaves_the_queue_and_late_results_are_ignored() -> None:
    queue = WorkQueue()
    key = queue.add([(i, [i]) for i in range(4)], None, group_size=2, prompts_per_chunk=2)
    running = queue.take()
    assert running is not None
    queue.cancel(key)
    assert queue.waiting == 0 and not queue.complete(key)
    queue.finish(running, _groups(running.prompts))  # arrives after the cancel: dropped
    queue.requeue(running)  # its worker died after the cancel: not queued again
    assert queue.waiting == 0
