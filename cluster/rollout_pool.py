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
        self.queue = WorkQueue()
        self._in_flight: dict[Any, tuple[int, Any, Chunk]] = {}  # generate ref -> (slot, actor, chunk)
        # load ref -> (slot, actor, version, (checksum, merged checksum or None))
        self._loading: dict[Any, tuple[int, Any, int, tuple[str, str | None]]] = {}
        self.held: dict[int, int] = {}  # slot -> version of the newest load sent to it
        now = time.monotonic()
        self._idle_at: dict[int, float | None] = dict.fromkeys(self.active, now)  # None: busy
        self._idle_s = 0.0  # worker-seconds with no generate call in flight, since take_metrics()

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
        now = time.monotonic()
        for slot in self.active:  # close the open idle spans at this instant
            since = self._idle_at.get(slot)
            if since is not None:
                self._idle_s += now - since
                self._idle_at[slot] = now
        workers = max(1, len(self.active))
        values = {
            "time/rollout_idle": self._idle_s / workers,
            "pool/workers": float(len(self.active)),  # active at the end of the step
            "pool/joining": float(len(self.joining)),
            "pool/restarts": float(self.events["restarts"]),
            "pool/requeued_prompts": float(self.events["requeued_prompts"]),
            "pool/dropped": float(self.events["dropped"]),
        }
        self.events.clear()
        self._idle_s = 0.0
        return values

    def _busy(self, slot: int) -> None:
        since = self._idle_at.get(slot)
        if since is not None:
            self._idle_s += time.monotonic() - since
        self._idle_at[slot] = None

    # ---- generate -------------------------------------------------------------------------------

    def generate(
        self, prompts: list[Prompt], group_size: int, seeds: list[int] | None, greedy: bool = False
    ) -> list[Group]:
        """One group of `group_size` completions per prompt, in prompt order (blocking).

        `seeds`: one per prompt slot (vLLM gives the n samples of a request seeds seed..seed+n-1),
        or None for greedy decoding. Raises RolloutPoolError when no worker is left.
        """
        self.admit(block=not self.active)
        key = self.submit(prompts, group_size, seeds, greedy)
        while not self.queue.complete(key):
            self.dispatch()
            self.wait()
        return self.queue.results(key)

    def submit(
        self,
        prompts: list[Prompt],
        group_size: int,
        seeds: list[int] | None,
        greedy: bool = False,
        *,
        policy_version: int | None = None,
        front: bool = False,
    ) -> int:
        """Queue a request without waiting; returns its key (`results(key)` once `complete(key)`).

        `policy_version`: only workers holding exactly that version run it (see `dispatch`);
        `front`: ahead of all waiting work."""
        size = self.prompts_per_chunk or -(-len(prompts) // max(1, len(self.active)))
        work = [(p.index, p.token_ids) for p in prompts]
        return self.queue.add(work, seeds, group_size, size, greedy, policy_version, front)

    def complete(self, key: int) -> bool:
        return self.queue.complete(key)

    def results(self, key: int) -> list[Group]:
        """A complete request's groups in prompt order; the request is forgotten."""
        return self.queue.results(key)

    def cancel(self, key: int) -> None:
        """Drop a request: waiting chunks leave the queue, running ones' results are ignored."""
        self.queue.cancel(key)

    def dispatch(self) -> None:
        """Hand waiting chunks to active workers that have none in flight, oldest first.

        A chunk pinned to a policy version goes only to a worker whose newest load is that version.
        A worker's calls run in the order they were sent, so a chunk handed out after a load runs
        under that load's policy, and one handed out before it under the previous one.
        """
        if not self.queue.waiting:
            return
        busy = {slot for slot, _, _ in self._in_flight.values()}
        held_now = {self.held.get(slot) for slot in self.active}
        for slot in sorted(self.active):
            if slot in busy:
                continue
            held = self.held.get(slot)

            def eligible(chunk: Chunk, held: int | None = held) -> bool:
                # A pinned chunk no worker holds the version of any more (all that did died) runs
                # on the newest policy.
                pinned = chunk.policy_version
                return pinned is None or pinned == held or pinned not in held_now

            chunk = self.queue.take(eligible)
            if chunk is None:
                continue
            actor = self.active[slot]
            self._in_flight[chunk_call(actor, chunk)] = (slot, actor, chunk)
            self._busy(slot)

    def wait(self, also: list[Any] | None = None) -> list[Any]:
        """Block until a chunk, a load or one of `also` (object refs) finishes.

        Finished chunks go into their requests (a failed one is re-queued and its worker handled as
        lost); finished loads are checked (SyncError on a wrong ack). Returns the refs of `also`
        that are done. With nothing to wait for it returns at once (after admitting joining workers
        when no worker is active: RolloutPoolError if none is left).
        """
        import ray

        also = list(also or [])
        if not self._in_flight and not self._loading and not also:
            if self.queue.waiting and not self.active:
                self.admit(block=True)
            return []
        refs = [*self._in_flight, *self._loading, *also]
        done, _ = ray.wait(refs, num_returns=1)
        ready_also = []
        for ref in done:
            if ref in self._in_flight:
                self._chunk_done(ref)
            elif ref in self._loading:
                self._load_done(ref)
            else:
                ready_also.append(ref)
        return ready_also

    def drain(self) -> None:
        """Wait for every chunk and load in flight (their results are kept, or ignored for cancelled
        requests); waiting chunks stay queued."""
        while self._in_flight or self._loading:
            self.wait()

    @property
    def in_flight(self) -> int:
        """Generate calls running now."""
        return len(self._in_flight)

    @property
    def busy(self) -> bool:
        """Whether a generate or load call is running."""
        return bool(self._in_flight or self._loading)

    def _chunk_done(self, ref: Any) -> None:
        import ray

        slot, actor, chunk = self._in_flight.pop(ref)
        current = self.active.get(slot) is actor  # not a worker since removed or replaced
        if current:
            self._idle_at[slot] = time.monotonic()
        try:
            groups = ray.get(ref)
        except ray.exceptions.RayError as err:
            self.queue.requeue(chunk)
            if current:
                self._lost(slot, err, len(chunk.prompts))
            return
        self.queue.finish(chunk, groups)
        self.chunks_by_slot[slot] += 1

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
            self._check_ack(slot, ack, version, checksum)
            self.held[slot] = version
            acks.append(ack)
        return acks

    def send(self, update_ref: Any, version: int, checksum: str, merged_checksum: str | None = None) -> None:
        """Every active worker loads the update after the calls already sent to it; returns at once.

        Acks are checked as they arrive (`wait`, `drain`), a wrong one raising SyncError; with
        `merged_checksum` (worker_merge's full check) also the weights each worker rebuilt.
        """
        for slot in sorted(self.active):
            actor = self.active[slot]
            self._loading[actor.load.remote(update_ref)] = (slot, actor, version, (checksum, merged_checksum))
            self.held[slot] = version

    def acked(self, version: int) -> bool:
        """Whether every active worker has acknowledged `version` (or a newer one)."""
        return all(
            self.last_acks.get(s) is not None and self.last_acks[s].version >= version for s in self.active
        )

    def _load_done(self, ref: Any) -> None:
        import ray

        slot, actor, version, (checksum, merged_checksum) = self._loading.pop(ref)
        try:
            ack = ray.get(ref)
        except ray.exceptions.RayError as err:
            if self.active.get(slot) is actor:
                self._lost(slot, err, 0, during=f"loading policy v{version}")
            return
        self._check_ack(slot, ack, version, checksum)
        check_merged(ack, version, merged_checksum)

    def _check_ack(self, slot: int, ack: SyncAck, version: int, checksum: str) -> None:
        if ack.version != version or ack.checksum != checksum:
            raise SyncError(
                f"rollout worker {slot} acknowledged policy v{ack.version} with checksum {ack.checksum}, "
                f"expected v{version} with checksum {checksum}: its weights differ from the learner's"
            )
        self.last_acks[slot] = ack

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
                self._idle_at[slot] = time.monotonic()
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
            self._forget(slot)  # a chunk it was running goes back to the queue when its call fails
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
        self._forget(slot)
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

    def _forget(self, slot: int) -> None:
        self.held.pop(slot, None)
        self._idle_at.pop(slot, None)

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


def check_merged(ack: SyncAck, version: int, merged_checksum: str | None) -> None:
    """worker_merge's full check: the weights a worker rebuilt must be the learner's merge, bit for
    bit. SyncError otherwise; nothing to check when the update did not ask (None)."""
    if merged_checksum is not None and ack.merged_checksum != merged_checksum:
        raise SyncError(
            f"rollout worker {ack.worker} rebuilt policy v{version} with checksum "
            f"{ack.merged_checksum}, but the learner's merge has {merged_checksum}: its merged "
            "weights drifted from the learner's (same arithmetic expected; see grpo_ray/merge_math.py)"
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""
