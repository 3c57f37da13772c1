"""The rollout pool: the rollout workers as one thing; spread prompts over them, sync them, check every ack."""

from __future__ import annotations

from typing import Any

from cluster.data.prompts import Prompt
from cluster.handles import RolloutWorkerHandle
from grpo_ray.partition import even_counts, split_by_counts
from grpo_ray.records import Group, SyncAck


class SyncError(RuntimeError):
    """A rollout worker did not confirm the policy version it was sent."""


class RolloutPool:
    """The rollout workers as one thing: generate over all of them, put them to sleep, sync them."""

    def __init__(self, workers: list[RolloutWorkerHandle], nodes: list[str]) -> None:
        self.workers = workers
        self.nodes = nodes  # the Ray node each worker runs on

    def generate(
        self, prompts: list[Prompt], group_size: int, seeds: list[int] | None, greedy: bool = False
    ) -> list[Group]:
        """One Group of `group_size` completions per prompt, in prompt order (P prompts -> P groups).

        The prompts are cut into contiguous slices, one per worker; `seeds[i]` (one per prompt, or
        None for engine-seeded sampling) travels with prompt i, so the groups do not depend on the
        number of workers. `greedy`: temperature 0 (evaluation). Raises ray.exceptions.RayError
        if a worker fails.
        """
        import ray

        counts = even_counts(len(prompts), len(self.workers))
        pairs = [(p.index, p.token_ids) for p in prompts]
        seed_slices = split_by_counts(seeds, counts) if seeds is not None else [None] * len(counts)
        futures = [
            worker.generate.remote(chunk, group_size, chunk_seeds, greedy)
            for worker, chunk, chunk_seeds in zip(
                self.workers, split_by_counts(pairs, counts), seed_slices, strict=True
            )
            if chunk
        ]
        return [group for part in ray.get(futures) for group in part]

    def sleep(self) -> None:
        """Every engine frees its device memory (colocate mode on a GPU; a no-op elsewhere)."""
        import ray

        ray.get([worker.sleep.remote() for worker in self.workers])

    def wake_up(self) -> None:
        """Every engine takes its device memory back (after `sleep`)."""
        import ray

        ray.get([worker.wake_up.remote() for worker in self.workers])

    def sync(self, update_ref: Any, version: int, checksum: str) -> list[SyncAck]:
        """Every worker loads the same object-store copy `update_ref`; returns one SyncAck per worker.

        Raises SyncError naming the worker if one fails to load, or acknowledges another policy
        version or checksum than (`version`, `checksum`) the learner exported.
        """
        import ray

        futures = [worker.load.remote(update_ref) for worker in self.workers]
        acks: list[SyncAck] = []
        for index, future in enumerate(futures):
            try:
                ack = ray.get(future)
            except ray.exceptions.RayError as err:
                raise SyncError(
                    f"rollout worker {index} failed while loading policy v{version}: {err}"
                ) from None
            if ack.version != version or ack.checksum != checksum:
                raise SyncError(
                    f"rollout worker {index} acknowledged policy v{ack.version} with checksum {ack.checksum}, "
                    f"expected v{version} with checksum {checksum}: its weights differ from the learner's"
                )
            acks.append(ack)
        return acks
