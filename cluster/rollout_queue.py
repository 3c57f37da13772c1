"""The rollout pool's work queue: a request's prompts cut into fixed chunks, handed to idle workers.

Pure Python (no Ray), so its bookkeeping is tested on its own. A chunk is a fixed, contiguous run of
`prompts_per_chunk` prompt slots with their per-slot seeds: which worker generates it never changes
what is generated, and a chunk lost with a dead worker is put back at the front and generated once,
whole, by another. Results come back in prompt order whatever order chunks finish in.

Each request has a key (the driver uses one request per step); chunks of several requests wait in
the same queue, oldest first: asynchronous rollouts (max_staleness > 0) queue future steps' prompts
here. A request may be pinned to one policy version (held-out evaluation of exactly that policy): its
chunks go only to a worker holding that version. A cancelled request's waiting chunks are removed and
the results of its chunks still running are ignored when they arrive.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from grpo_ray.records import Group


@dataclass(frozen=True)
class Chunk:
    """One generate call's worth of work."""

    key: int  # the request it belongs to
    index: int  # its position in that request: results are put back in this order
    prompts: list[tuple[int, list[int]]]  # (dataset row index, prompt token ids)
    seeds: list[int] | None  # one per prompt slot; None: greedy or unseeded
    group_size: int
    greedy: bool
    policy_version: int | None = None  # pinned: only a worker holding exactly this version runs it


class WorkQueue:
    def __init__(self) -> None:
        self._pending: deque[Chunk] = deque()
        self._chunks: dict[int, int] = {}  # key -> number of chunks of the request
        self._done: dict[int, dict[int, list[Group]]] = {}  # key -> chunk index -> its groups
        self._next_key = 0
        self._cancelled: set[int] = set()

    def add(
        self,
        prompts: list[tuple[int, list[int]]],
        seeds: list[int] | None,
        group_size: int,
        prompts_per_chunk: int,
        greedy: bool = False,
        policy_version: int | None = None,
        front: bool = False,
    ) -> int:
        """Queue a request; returns its key. Chunk c holds prompt slots [c*size, (c+1)*size).

        `policy_version`: pin every chunk to that version. `front`: ahead of everything waiting (a
        step's regenerated prompts, which the learner waits for first)."""
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one seed per prompt slot")
        key = self._next_key
        self._next_key += 1
        size = max(1, prompts_per_chunk)
        starts = range(0, len(prompts), size)
        chunks = []
        for index, start in enumerate(starts):
            part = None if seeds is None else seeds[start : start + size]
            chunks.append(
                Chunk(key, index, prompts[start : start + size], part, group_size, greedy, policy_version)
            )
        if front:
            self._pending.extendleft(reversed(chunks))
        else:
            self._pending.extend(chunks)
        self._chunks[key] = len(starts)
        self._done[key] = {}
        return key

    def take(self, eligible: Callable[[Chunk], bool] | None = None) -> Chunk | None:
        """The oldest waiting chunk (that `eligible` accepts), or None when none waits."""
        for position, chunk in enumerate(self._pending):
            if eligible is None or eligible(chunk):
                del self._pending[position]
                return chunk
        return None

    def requeue(self, chunk: Chunk) -> None:
        """A chunk whose worker died goes back to the front: it is the oldest work."""
        if chunk.key not in self._cancelled:
            self._pending.appendleft(chunk)

    def cancel(self, key: int) -> None:
        """Forget a request: its waiting chunks leave the queue; results still arriving are ignored."""
        self._pending = deque(c for c in self._pending if c.key != key)
        self._chunks.pop(key, None)
        self._done.pop(key, None)
        self._cancelled.add(key)

    def pinned_waiting(self, below: int) -> bool:
        """Whether a chunk pinned to a version under `below` still waits to be handed out."""
        return any(c.policy_version is not None and c.policy_version < below for c in self._pending)

    def finish(self, chunk: Chunk, groups: list[Group]) -> None:
        """Record a chunk's groups (ignored for a cancelled request). RuntimeError: generated twice,
        or not one group per prompt."""
        if chunk.key in self._cancelled:
            return
        if chunk.index in self._done[chunk.key]:
            raise RuntimeError(f"chunk {chunk.index} of request {chunk.key} was generated twice")
        if len(groups) != len(chunk.prompts):
            raise RuntimeError(f"a worker returned {len(groups)} groups for {len(chunk.prompts)} prompts")
        self._done[chunk.key][chunk.index] = groups

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def complete(self, key: int) -> bool:
        return key in self._chunks and len(self._done[key]) == self._chunks[key]

    def results(self, key: int) -> list[Group]:
        """The request's groups in prompt order; the request is forgotten."""
        if not self.complete(key):
            raise RuntimeError(f"request {key} still has chunks outstanding")
        done = self._done.pop(key)
        del self._chunks[key]
        return [group for index in sorted(done) for group in done[index]]


def chunk_call(worker: Any, chunk: Chunk) -> Any:
    """Start `chunk` on `worker` (a RolloutWorker handle); returns the call's object ref."""
    return worker.generate.remote(chunk.prompts, chunk.group_size, chunk.seeds, chunk.greedy)
