"""Typed handles of what the driver talks to, as `Protocol`s (a Ray `ActorHandle` itself is untyped).

`LearnerHandle` is what `cluster.placement.start_learner_group` returns (a
`learner.data_parallel.LearnerGroup`, plain blocking calls on the driver). `RolloutWorkerHandle` is
a `ray.remote(rollout.worker.RolloutWorker)` actor: each verb is called as `.remote(...)` and returns
an ObjectRef of what the `RolloutWorker` method returns (named beside each verb below).
"""

from __future__ import annotations

from typing import Any, Protocol

from grpo_ray.records import Batch


class RemoteMethod(Protocol):
    """One Ray actor method: `.remote(*args)` schedules it and returns an ObjectRef at once."""

    def remote(self, *args: Any, **kwargs: Any) -> Any: ...


class RolloutWorkerHandle(Protocol):
    """A RolloutWorker actor (rollout/worker.py has each verb's arguments, shapes and errors)."""

    generate: RemoteMethod  # (prompts, group_size, seeds, greedy) -> ref of list[Group]
    load: RemoteMethod  # (WeightUpdate or its ref) -> ref of SyncAck
    sleep: RemoteMethod  # () -> ref of None
    wake_up: RemoteMethod  # () -> ref of None
    check_weight_names: RemoteMethod  # (names) -> ref of list[str] (problems; empty: all map)
    packed_modules: RemoteMethod  # () -> ref of dict[str, list[str]] (the engine's fused modules)
    info: RemoteMethod  # () -> ref of dict[str, Any]


class PendingTrainHandle(Protocol):
    """An update running on the learner (`learner.data_parallel.PendingTrainStep`)."""

    refs: list[Any]  # Ray object refs to wait on

    def result(self) -> dict[str, float]: ...


class LearnerHandle(Protocol):
    """The learner's verbs as the driver calls them (blocking; one or more data-parallel ranks)."""

    @property
    def world_size(self) -> int: ...

    def train_step(self, batch: Batch) -> dict[str, float]: ...

    def start_train_step(self, batch: Batch) -> PendingTrainHandle: ...

    def export_for_sync(
        self, kind: str, include_base: bool, check_every: int = 0, final_version: int = -1
    ) -> tuple[Any, Any]: ...

    def weight_names(self, packed_modules: dict[str, list[str]]) -> list[str]: ...

    def checkpoint_state(self) -> dict[str, Any]: ...

    def restore(self, state: dict[str, Any], version: int) -> None: ...

    def load_adapter(self, tensors: dict[str, Any]) -> None: ...

    def stop(self) -> None: ...
