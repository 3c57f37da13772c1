"""The rollout pool: rollout workers pull chunks of a step's prompts from a work queue; a worker that
dies is restarted and fully re-synced before it takes work again; the pool grows and shrinks.

Scheduling: every active worker has at most one chunk in flight; `ray.wait` returns the first call
to finish and that worker takes the next chunk, so a fast worker takes more chunks than a slow one.
A chunk is fixed by its prompt slots and their seeds (cluster/rollout_queue.py), so what is sampled
does not depend on which worker ran it, nor on how many workers there are.

Loss: a call failing with a Ray actor error (process killed, node gone, engine crashed) or raising
inside the worker marks the worker lost; its chunk goes back to the front of the queue, and a new
actor is started for its slot (cluster/placement.py `WorkerSlots`). The new actor is *joining*: it
takes work only after a full sync (every 4-bit layer plus the adapter) that it acknowledged with the
learner's (version, checksum). Joining workers are admitted at a step boundary, or at once when no
worker is left to finish the step. A slot that dies more than `max_restarts` times is dropped with
a warning; the run stops (RolloutPoolError) only when no worker is left at all.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cluster.data.prompts import Prompt
from cluster.rollout_queue import Chunk, WorkQueue, chunk_call
from grpo_ray.records import Group, SyncAck


class SyncError(RuntimeError):
    """A rollout worker did not confirm the policy version it was sent."""


class RolloutPoolError(RuntimeError):
    """No rollout worker is left (or the pool cannot start the workers it was asked for)."""


@dataclass
class _Joining:
    actor: Any
    ready: Any  # ref of the actor's first call: it resolves once the engine has loaded
    since: float  # time.monotonic() when it was started


class RolloutPool:
    """The rollout workers as one thing.

    `workers`/`nodes`: the workers already started (slot i = workers[i]) and their Ray nodes.
    `spawner`: a `cluster.placement.WorkerSlots` (or anything with its `start`, `release`, `node`,
    `stop`); None makes a fixed pool whose dead workers are dropped, not restarted.
    `full_sync(slots) -> acks`: set by the driver; sends the current policy with the base layers to
    exactly those slots (through `sync(..., slots=...)`). Without it, no worker can join.
    """

    def __init__(
        self,
        workers: list[Any],
        nodes: list[str],
        spawner: Any = None,
        *,
        prompts_per_chunk: int | None = None,
        max_restarts: int = 0,
        restart_timeout_s: float = 600.0,
        echo: Callable[[str], Any] = print,
    ) -> None:
        self.active: dict[int, Any] = dict(enumerate(workers))
        self._nodes: dict[int, str] = dict(enumerate(nodes))
        self.joining: dict[int, _Joining] = {}
        self.spawner = spawner
        self.prompts_per_chunk = prompts_per_chunk
        self.max_restarts = max_restarts
        self.restart_timeout_s = restart_timeout_s
        self.echo = echo
        self.full_sync: Callable[[list[int]], list[SyncAck]] | None = None
        self.step = 0  # for log lines: the step the driver is in
        self.restarts: Counter[int] = Counter()  # slot -> times it was restarted
        self.dropped: set[int] = set()  # slots given up after too many restarts
        self.events: Counter[str] = Counter()  # since the last take_metrics()
        self.chunks_by_slot: Counter[int] = Counter()  # chunks each slot generated (scheduling tests)
        self.last_acks: dict[int, SyncAck] = {}  # slot -> the newest ack it sent
        self.packed_modules: dict[str, list[str]] = {}  # the engine's fusion map, for a new learner
        self._workers_at_start = len(workers)

    # ---- what the driver reads ------------------------------------------------------------------

    @property
    def workers(self) -> list[Any]:
        return [self.active[slot] for slot in sorted(self.active)]

    @property
    def nodes(self) -> list[str]:
        return [self._nodes.get(slot, "?") for slot in sorted(self.active)]

    @property
    def size(self) -> int:
        """Workers active or joining: what `resize` compares against."""
        return len(self.active) + len(self.joining)

    def take_metrics(self) -> dict[str, float]:
        """This step's pool metrics; the event counts restart from zero."""
        values = {
            "pool/workers": float(self._workers_at_start),
            "pool/joining": float(len(self.joining)),
            "pool/restarts": float(self.events["restarts"]),
            "pool/requeued_prompts": float(self.events["requeued_prompts"]),
            "pool/dropped": float(self.events["dropped"]),
        }
        self.events.clear()
        return values

    # ---- generate -------------------------------------------------------------------------------

    def generate(
        self, prompts: list[Prompt], group_size: int, seeds: list[int] | None, greedy: bool = False
    ) -> list[Group]:
        """One group of `group_size` completions per prompt, in prompt order.

        `seeds`: one per prompt slot (vLLM gives the n samples of a request seeds seed..seed+n-1),
        or None for greedy decoding. Raises RolloutPoolError when no worker is left.
        """
        import ray

        self.admit(block=not self.active)
        self._workers_at_start = len(self.active)
        queue = WorkQueue()
        size = self.prompts_per_chunk or -(-len(prompts) // max(1, len(self.active)))
        key = queue.add([(p.index, p.token_ids) for p in prompts], seeds, group_size, size, greedy)
        in_flight: dict[Any, tuple[int, Chunk]] = {}  # call ref -> (slot, chunk)
        while not queue.complete(key):
            busy = {slot for slot, _ in in_flight.values()}
            for slot in sorted(self.active):
                if slot not in busy and queue.waiting:
                    chunk = queue.take()
                    assert chunk is not None
                    in_flight[chunk_call(self.active[slot], chunk)] = (slot, chunk)
            if not in_flight:  # work is waiting and no worker is active: wait for a joining one
                self.admit(block=True)
                continue
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                slot, chunk = in_flight.pop(ref)
                try:
                    groups = ray.get(ref)
                except ray.exceptions.RayError as err:
                    queue.requeue(chunk)
                    self._lost(slot, err, len(chunk.prompts))
                    continue
                queue.finish(chunk, groups)
                self.chunks_by_slot[slot] += 1
        return queue.results(key)

    # ---- sync -----------------------------------------------------------------------------------

    def sync(
        self, update_ref: Any, version: int, checksum: str, slots: list[int] | None = None
    ) -> list[SyncAck]:
        """Workers load the same object-store copy; a wrong ack stops the run (SyncError).

        `slots`: only these (active or joining) workers; default every active one. A worker that
        dies while loading is handled as lost (restarted, re-synced when it joins) and has no ack.
        """
        import ray

        targets = sorted(self.active) if slots is None else slots
        handles = {s: self.active[s] if s in self.active else self.joining[s].actor for s in targets}
        futures = {slot: handle.load.remote(update_ref) for slot, handle in handles.items()}
        acks: list[SyncAck] = []
        for slot, future in futures.items():
            try:
                ack = ray.get(future)
            except ray.exceptions.RayError as err:
                self._lost(slot, err, 0, during=f"loading policy v{version}")
                continue
            if ack.version != version or ack.checksum != checksum:
                raise SyncError(
                    f"rollout worker {slot} acknowledged policy v{ack.version} with checksum {ack.checksum}, "
                    f"expected v{version} with checksum {checksum}: its weights differ from the learner's"
                )
            self.last_acks[slot] = ack
            acks.append(ack)
        return acks

    def sleep(self) -> None:
        self._call_all("sleep")

    def wake_up(self) -> None:
        self._call_all("wake_up")

    # ---- membership -----------------------------------------------------------------------------

    def admit(self, block: bool = False) -> list[int]:
        """Joining workers whose engine is up get a full sync and become active; returns their slots.

        `block`: wait until at least one joins (RolloutPoolError if none is left to wait for).
        A worker that fails to start, or is not up within `restart_timeout_s`, is handled as lost.
        """
        import ray

        while True:
            now = time.monotonic()
            for slot, joining in list(self.joining.items()):
                if now - joining.since > self.restart_timeout_s:
                    self._lost(slot, TimeoutError(f"not up after {self.restart_timeout_s:.0f} s"), 0)
            if not self.joining:
                if block and not self.active:
                    raise RolloutPoolError(self._none_left())
                return []
            refs = {joining.ready: slot for slot, joining in self.joining.items()}
            timeout = min(5.0, self.restart_timeout_s) if block else 0
            done, _ = ray.wait(list(refs), num_returns=len(refs) if not block else 1, timeout=timeout)
            up = []
            for ref in done:
                slot = refs[ref]
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as err:
                    self._lost(slot, err, 0, during="starting")
                    continue
                up.append(slot)
            joined = self._join(up) if up else []
            if joined or not block:
                return joined

    def _join(self, slots: list[int]) -> list[int]:
        if self.full_sync is None:
            raise RolloutPoolError("the rollout pool has no full_sync: workers cannot join")
        acks = {ack.worker: ack for ack in self.full_sync(slots)}
        joined = []
        for slot in slots:
            if slot in self.joining and slot in acks:
                self.active[slot] = self.joining.pop(slot).actor
                self._nodes[slot] = self.spawner.node(slot) if self.spawner is not None else "?"
                ack = acks[slot]
                self.echo(
                    f"rollout worker {slot} joined at step {self.step} (node {self._nodes[slot][:12]}) "
                    f"after a full sync to policy v{ack.version} (checksum {ack.checksum})"
                )
                joined.append(slot)
        return joined

    def resize(self, workers: int) -> None:
        """Start or remove workers so that `workers` are active or joining (call at a step boundary).

        New workers join after their first full sync; removed ones are the highest slots, joining
        ones first. Raises RolloutPoolError when the pool cannot start workers.
        """
        if workers < 1:
            raise RolloutPoolError(f"a rollout pool needs at least one worker, asked for {workers}")
        if workers > self.size and self.spawner is None:
            raise RolloutPoolError("this rollout pool was built from fixed workers and cannot grow")
        while self.size < workers:
            slot = next(
                s
                for s in range(10**6)
                if s not in self.active and s not in self.joining and s not in self.dropped
            )
            self._start(slot)
            self.echo(f"rollout pool grows to {workers} at step {self.step}: worker {slot} starting")
        while self.size > workers:
            slot = max(self.joining) if self.joining else max(self.active)
            actor = self.joining.pop(slot).actor if slot in self.joining else self.active.pop(slot)
            self._release(slot, actor)
            self.echo(f"rollout pool shrinks to {workers} at step {self.step}: worker {slot} removed")

    def stop(self) -> None:
        for slot, actor in [*self.active.items(), *((s, j.actor) for s, j in self.joining.items())]:
            self._release(slot, actor)
        self.active.clear()
        self.joining.clear()
        if self.spawner is not None:
            self.spawner.stop()

    # ---- loss -----------------------------------------------------------------------------------

    def _lost(self, slot: int, err: BaseException, requeued: int, during: str = "") -> None:
        actor = self.active.pop(slot, None)
        if actor is None and slot in self.joining:
            actor = self.joining.pop(slot).actor
        node = self._nodes.get(slot, "?")
        self.events["requeued_prompts"] += requeued
        self.restarts[slot] += 1
        count = self.restarts[slot]
        what = f"{type(err).__name__}: {_first_line(err)}"
        where = f" while {during}" if during else ""
        head = f"rollout worker {slot} died at step {self.step}{where} (node {node[:12]}; {what}): {requeued} prompts re-queued"
        if actor is not None:
            self._release(slot, actor)
        if self.spawner is None or count > self.max_restarts:
            self.dropped.add(slot)
            self.events["dropped"] += 1
            self.echo(
                f"WARNING: {head}; dropped after {count - 1} restart(s) (rollout.max_restarts = {self.max_restarts})"
            )
            if not self.active and not self.joining:
                raise RolloutPoolError(self._none_left(what))
            return
        self.events["restarts"] += 1
        self.echo(f"{head}, restarting ({count}/{self.max_restarts})")
        self._start(slot)

    def _start(self, slot: int) -> None:
        assert self.spawner is not None
        actor = self.spawner.start(slot)
        self.joining[slot] = _Joining(actor, actor.info.remote(), time.monotonic())

    def _release(self, slot: int, actor: Any) -> None:
        if self.spawner is not None:
            self.spawner.release(slot, actor)
        else:
            import ray

            ray.kill(actor)

    def _call_all(self, method: str) -> None:
        import ray

        futures = {slot: getattr(actor, method).remote() for slot, actor in self.active.items()}
        for slot, future in futures.items():
            try:
                ray.get(future)
            except ray.exceptions.RayError as err:
                self._lost(slot, err, 0, during=method)

    def _none_left(self, last: str = "") -> str:
        restarts = ", ".join(f"worker {s}: {n}" for s, n in sorted(self.restarts.items())) or "none"
        return (
            f"no rollout worker is left at step {self.step} (restarts so far: {restarts}; "
            f"rollout.max_restarts = {self.max_restarts}){'; last error ' + last if last else ''}. "
            "Completed checkpoints are kept: fix the cause (see the workers' log lines above) and rerun with --resume"
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""
