"""Start a run's actors: Ray, the learner and the rollout workers, as much in parallel as they allow.

`launch` returns as soon as every actor has been *created* (each loads its model in its own process
from then on); the driver does its own start-up work (the reward scorer's processes) meanwhile, and
`await_ready` then waits for the actors and checks that the learner's weights map onto the engine.
Every phase goes into the run's `StartupClock`.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cluster.config import RunConfig
from cluster.handles import LearnerHandle
from cluster.ray_session import init_ray
from cluster.rollout_pool import RolloutPool, SyncError
from cluster.telemetry.startup import StartupClock

T = TypeVar("T")


@dataclass
class Launched:
    cfg: RunConfig
    learner: LearnerHandle
    workers: list[Any]  # RolloutWorker actor handles, in slot order
    slots: Any  # cluster.placement.WorkerSlots: starts, restarts and releases workers by slot


def start_ray(cfg: RunConfig) -> bool:
    """Connect to (or start) Ray. True when this call connected (the caller shuts it down).

    No address: the job's cluster inside `ray job submit` (RAY_ADDRESS), else the Ray of a warm pool
    on this machine (cluster/warm_pool), else a NEW local Ray bound to loopback only
    (cluster/ray_session.py); ray.init() alone would join any Ray on the machine.
    """
    import ray

    from cluster.warm_pool import client as warm_pool

    if ray.is_initialized():
        return False
    pool = warm_pool.usable(cfg)
    if pool is not None and warm_pool.connect(pool):
        return True  # `launch` claims the spares, or starts cold when they are not this run's
    init_ray(cfg.ray_address, log_to_driver=True)
    return True


def while_ray_starts(cfg: RunConfig, load: Callable[[], T], clock: StartupClock) -> tuple[T, bool]:
    """`load()` (the prompts), then the actor classes' imports, in a thread while this thread starts Ray.

    Ray's start is mostly waiting for its own processes (a third of two cores' time stays idle on
    the demo machine), so the two overlap. Creating an actor needs its class, and the learner's
    module imports torch (~2.5 CPU s): done here, not on the critical path after Ray is up. No model
    loads before the data is checked: a bad row still fails first (and a Ray started here is shut
    down). Returns (what `load` returned, whether Ray was started here: then `launch` gets
    `ray_started=True`).
    """

    def load_then_import() -> T:
        loaded = load()
        import_actor_classes()
        return loaded

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="load-data") as pool:
        loading = pool.submit(load_then_import)
        with clock.span("ray start"):
            started = start_ray(cfg)
        try:
            return loading.result(), started
        except BaseException:
            if started:
                import ray

                ray.shutdown()
            raise


def import_actor_classes() -> None:
    """Import the modules of the actor classes the driver creates (no model, no engine)."""
    import learner.learner  # noqa: F401
    import rollout.worker  # noqa: F401


def launch(
    cfg: RunConfig,
    model: str,
    pad_id: int,
    stack: Any,
    echo: Any,
    clock: StartupClock,
    ray_started: bool = False,
) -> Launched:
    """Create the rollout workers first (their engines take longest to build), then the learner.

    Both only get created here; their constructors run in their own processes from now on. Ray is
    started here unless it runs already; a Ray started here (or by `while_ray_starts`, when
    `ray_started`) is shut down when `stack` closes.
    """
    import ray

    from cluster.placement import WorkerSlots, start_learner_group

    if not ray.is_initialized():
        with clock.span("ray start"):
            ray_started = start_ray(cfg)
    if ray_started:
        stack.callback(ray.shutdown)
    adopted = _adopt_warm_spares(cfg, model, pad_id, echo, clock)
    with clock.span("create actors"):
        slots = WorkerSlots(cfg, model, echo, adopted=adopted.workers if adopted else None)
        workers = [slots.start(i) for i in range(cfg.rollout.num_workers)]
        stack.callback(slots.stop)  # also when await_ready fails before the pool owns them
        learner = adopted.learner if adopted else start_learner_group(cfg, model, pad_id)
        stack.callback(learner.stop)
    return Launched(cfg, learner, workers, slots)


def _adopt_warm_spares(cfg: RunConfig, model: str, pad_id: int, echo: Any, clock: StartupClock) -> Any:
    """The warm pool's spares when this run joined its Ray and they are this run's actors (a
    cluster.warm_pool.client.Adopted), else None; a pool that cannot serve the run is left, and the
    run starts its own Ray, as without a pool."""
    import ray

    from cluster.warm_pool import client as warm_pool

    pool = warm_pool.connected()
    if pool is None:
        notice = warm_pool.take_notice()
        if notice is not None:
            echo(notice)
        return None
    with clock.span("claim warm spares"):
        adopted, why = warm_pool.claim(cfg, model, pad_id)
    if adopted is not None:
        echo(
            f"warm pool: this run starts from its {len(adopted.workers)} rollout worker(s) and learner "
            f"(made by `grpo-ray warm up` for '{pool.config}', pid {pool.pid})"
        )
        return adopted
    echo(f"warm pool of '{pool.config}' not used: {why}; starting cold")
    ray.shutdown()
    with clock.span("ray start"):
        init_ray(cfg.ray_address, log_to_driver=True)
    return None


def await_ready(
    launched: Launched, echo: Any, clock: StartupClock, stack: Any
) -> tuple[LearnerHandle, RolloutPool]:
    """Wait for engine 0 and the learner, check the weight-name map; the other engines may still build
    (the first sync queues behind their constructors). Raises SyncError if the names do not map."""
    import ray

    cfg, workers, learner = launched.cfg, launched.workers, launched.learner
    with clock.span("wait for actors"):
        pool = RolloutPool(
            workers,
            launched.slots.nodes(len(workers)),
            launched.slots,
            prompts_per_chunk=cfg.rollout.prompts_per_chunk,
            max_restarts=cfg.rollout.max_restarts,
            restart_timeout_s=cfg.rollout.restart_timeout_s,
            echo=echo,
        )
        stack.callback(pool.stop)
        packed = ray.get(workers[0].packed_modules.remote())
        pool.packed_modules = packed  # a restarted learner is told the engine's fusion map
        names = learner.weight_names(packed)
        problems = ray.get(workers[0].check_weight_names.remote(names))
    if problems:
        raise SyncError(
            "the learner's weights do not map onto the rollout engine:\n  " + "\n  ".join(problems[:10])
        )
    ready = clock.phases[-1]
    echo(
        f"actors ready {clock.since_origin(ready.end):.0f} s after launch; "
        f"{len(names)} learner parameters map onto the engine"
    )
    return learner, pool


def report_startup(clock: StartupClock, learner: Any, workers: list[Any], run_dir: Path, echo: Any) -> None:
    """Just before the first step: add every actor's own phases, print the one-line breakdown and
    write RUN_DIR/startup.json (rewritten at the end of the run with the later phases)."""
    import ray

    clock.add_actor("learner", learner.startup_spans())
    for index, spans in enumerate(ray.get([w.startup_spans.remote() for w in workers])):
        clock.add_actor(f"engine-{index}", spans)
    clock.mark("first step")
    echo(clock.line())
    clock.write(run_dir)
