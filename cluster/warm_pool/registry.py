"""SparePool: the Ray actor that holds one config's spares and hands them to one run at a time.

It lives in the warm pool's own Ray (cluster/warm_pool/daemon.py), detached, in NAMESPACE. Its
methods run one at a time (a plain Ray actor), so two runs cannot claim the same spares; a thread
watches the run that holds them and, once that run's driver is gone, kills whatever of them is left
and starts new spares for the next run. While no run holds them it also replaces a spare that died.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any

from cluster.placement import ActorSpec
from cluster.warm_pool.keys import SpareKey, code_digest, mismatch, model_digest

NAMESPACE = "grpo-ray-warm"
POOL_NAME = "spare-pool"
WATCH_INTERVAL_S = 0.5
PING_EVERY_S = 2.0  # how often idle spares are checked to be alive
PING_TIMEOUT_S = 5.0


@dataclass
class _Spare:
    key: SpareKey
    spec: ActorSpec
    actor: Any = None
    ready: Any = None  # resolves when the actor's constructor has finished (its startup_spans)
    generation: int = 0


class SparePool:
    """The spares of one config: `claim` hands all of them to a run, `status` says how they are.

    `model` is the model the specs load (keys.local_model): a spare started later is keyed by the
    code and model files on disk when it starts, which is what its process imports and loads.
    """

    def __init__(self, spares: list[tuple[SpareKey, ActorSpec]], model: str) -> None:
        self._spares = [_Spare(key, spec) for key, spec in spares]
        self._model = model
        self._lock = threading.Lock()
        self._lease: Any = None  # an object the claiming driver owns: lost when that driver is gone
        self.claims = 0
        self._idle_since = time.time()  # reset while spares are building: idle means built, unused
        self._pinged = 0.0
        with self._lock:
            for spare in self._spares:
                self._start(spare)
        threading.Thread(target=self._watch, name="spare-pool-watch", daemon=True).start()

    def keys(self) -> list[SpareKey]:
        """The spares' keys, in the order `claim` hands the actors out."""
        return [spare.key for spare in self._spares]

    def claim(self, wanted: list[SpareKey], lease: list[Any]) -> tuple[list[Any] | None, str]:
        """(every spare's actor handle, "") when `wanted` matches the keys and none is in use, else
        (None, why not). `lease` is `[ObjectRef]` of an object the caller's driver owns: the spares
        are the caller's until that object is lost (its driver exited or was killed). A spare found
        dead is replaced first (the run then adopts its replacement while it builds)."""
        with self._lock:
            if self._lease is not None:
                return None, "its spares are in use by another run"
            self._replace_dead()
            why = mismatch(self.keys(), wanted)
            if why is not None:
                return None, why
            failed = self._failed()
            if failed:
                return None, "a spare failed to start (" + "; ".join(failed) + ")"
            self._lease = lease[0]
            self.claims += 1
            return [spare.actor for spare in self._spares], ""

    def status(self) -> dict[str, Any]:
        """{'spares', 'ready' (constructed), 'failed' (role: error, for each spare whose constructor
        raised), 'in_use', 'claims', 'idle_s' (seconds built and unused; 0 while in use or building)}."""
        with self._lock:
            ready = self._ready_count()
            now = time.time()
            if self._lease is not None or ready < len(self._spares):
                self._idle_since = now
            return {
                "spares": len(self._spares),
                "ready": ready,
                "failed": self._failed(),
                "in_use": self._lease is not None,
                "claims": self.claims,
                "idle_s": now - self._idle_since,
            }

    def _start(self, spare: _Spare) -> None:
        spare.generation += 1
        # What the new process will import and load: the files on disk now, not at warm up.
        spare.key = {**spare.key, "code": code_digest(), "model": model_digest(self._model)}
        spare.actor = spare.spec.create(
            name=f"spare.{spare.key['role']}.{spare.generation}",
            namespace=NAMESPACE,
            lifetime="detached",  # the claiming run's driver must not own it: it outlives this call
        )
        spare.ready = spare.actor.startup_spans.remote()

    def _ready_count(self) -> int:
        import ray

        refs = [spare.ready for spare in self._spares]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        return len(done)

    def _failed(self) -> list[str]:
        """'role: error' of each spare whose constructor raised."""
        return [
            f"{spare.key['role']}: {_first_line(error)}"
            for spare in self._spares
            if isinstance(error := _construction(spare), BaseException)
        ]

    def _replace_dead(self) -> None:
        """Start a new spare for each built one that no longer answers (killed, out of memory)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        for spare in self._spares:
            if _construction(spare) is not True:  # still building, or its constructor raised
                continue  # (_failed() reports that: a retry would raise again)
            try:
                ray.get(spare.actor.startup_spans.remote(), timeout=PING_TIMEOUT_S)
            except GetTimeoutError:  # alive but slow to answer: left as it is
                continue
            except RayActorError:
                self._start(spare)

    def _watch(self) -> None:
        while True:
            time.sleep(WATCH_INTERVAL_S)
            with self._lock:
                if self._lease is None:
                    if time.time() - self._pinged > PING_EVERY_S:
                        self._replace_dead()
                        self._pinged = time.time()
                elif _owner_gone(self._lease):
                    self._release()

    def _release(self) -> None:
        """The run is gone: what it left alive goes, and the next run's spares start (a run ends by
        killing its actors, so they start on the resources it freed)."""
        import ray

        for spare in self._spares:
            with contextlib.suppress(Exception):  # already dead: the run killed it
                ray.kill(spare.actor)
        self._lease = None
        for spare in self._spares:
            self._start(spare)


def _construction(spare: _Spare) -> bool | BaseException:
    """How `spare`'s constructor ended: False while it runs, True when it returned, else its error."""
    import ray

    done, _ = ray.wait([spare.ready], timeout=0)
    if not done:
        return False
    try:
        ray.get(spare.ready)
    except Exception as err:
        return err
    return True


def _owner_gone(lease: Any) -> bool:
    import ray
    from ray.exceptions import GetTimeoutError, ObjectLostError

    try:
        ray.get(lease, timeout=1.0)
    except GetTimeoutError:  # a driver too busy to answer is still there
        return False
    except ObjectLostError:  # OwnerDiedError is one
        return True
    return False


def _first_line(err: BaseException) -> str:
    """The message of the error a constructor raised, without Ray's wrapping and traceback."""
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"
