"""The warm pool's process: `python -m cluster.warm_pool.daemon CONFIG_JSON IDLE_LIMIT_S`.

Started by `grpo-ray warm up` in its own session (it outlives the command). It starts a local Ray
(loopback only, cluster/ray_session.py), the SparePool actor with one spare per actor of a run of
the config, and rewrites the state file every second. It stops on SIGTERM (`grpo-ray warm down`),
SIGINT, or after IDLE_LIMIT_S seconds without a run; its Ray, and every spare with it, stops then.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster.config import RunConfig
    from cluster.placement import ActorSpec
    from cluster.warm_pool.keys import SpareKey

STATUS_INTERVAL_S = 1.0


def main(argv: list[str]) -> int:
    config_json, idle_limit_s = Path(argv[0]), float(argv[1])
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda number, _frame: stopping.append(number))

    from cluster.config import ConfigError, RunConfig
    from cluster.warm_pool.state import pool_dir

    directory = pool_dir()
    assert directory is not None, "`warm up` starts the daemon only with a cache directory"
    with open(directory / "daemon.lock", "w") as lock:  # held while this process lives: one pool
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("error: another warm pool is running; stop it with `grpo-ray warm down`", flush=True)
            return 1
        cfg = RunConfig.model_validate_json(config_json.read_text())
        try:
            return _serve(cfg, config_json, idle_limit_s, stopping)
        except ConfigError as err:
            print(f"error: {err}", flush=True)
            return 2


def _serve(cfg: RunConfig, config_json: Path, idle_limit_s: float, stopping: list[int]) -> int:
    import ray

    from cluster.driver import model_path
    from cluster.ray_session import init_ray
    from cluster.warm_pool.keys import local_model
    from cluster.warm_pool.registry import NAMESPACE, POOL_NAME, SparePool
    from cluster.warm_pool.state import PoolState, remove_state, write_state

    init_ray(None, log_to_driver=False)
    pid = os.getpid()
    state = PoolState(
        pid=pid,
        address=ray.get_runtime_context().gcs_address,
        config=cfg.name,
        config_path=str(config_json),
        log=str(config_json.with_name("daemon.log")),
        started=time.time(),
        idle_limit_s=idle_limit_s,
    )
    try:
        write_state(state)  # from now on `warm status` and `warm down` see it (spares: 0, starting)
        model = local_model(model_path(cfg))
        spares = _spares(cfg, model)
        _check_resources(spares)
        pool: Any = (
            ray.remote(SparePool)
            .options(name=POOL_NAME, namespace=NAMESPACE, lifetime="detached", num_cpus=0)
            .remote(spares, model)
        )
        while not stopping:
            try:
                status = ray.get(pool.status.remote(), timeout=60)
            except Exception as err:  # its Ray is gone (killed, out of memory): so is the pool
                print(f"error: the pool's Ray stopped answering ({type(err).__name__}); stopping", flush=True)
                return 1
            state.spares, state.ready, state.failed = status["spares"], status["ready"], status["failed"]
            state.in_use, state.claims, state.idle_s = status["in_use"], status["claims"], status["idle_s"]
            write_state(state)
            if state.idle_s > idle_limit_s:
                print(f"no run for {idle_limit_s:.0f} s: stopping the warm pool", flush=True)
                break
            time.sleep(STATUS_INTERVAL_S)
    finally:
        remove_state(pid)
        ray.shutdown()
    return 0


def _check_resources(spares: list[tuple[SpareKey, ActorSpec]]) -> None:
    """Refuse spares this machine's Ray could never place (e.g. a GPU learner on a CPU machine):
    they would wait for resources forever."""
    import ray

    from cluster.config import ConfigError

    have = ray.cluster_resources()
    for resource, option in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        need = sum(float(spec.options.get(option) or 0) for _, spec in spares)
        if need > have.get(resource, 0.0) + 1e-9:  # Ray's resources are multiples of 1e-4
            raise ConfigError(
                f"the run's actors ask for {need:g} {resource} in all, and this machine has "
                f"{have.get(resource, 0.0):g}: lower learner.num_{option[4:]} / rollout.num_{option[4:]}_per_worker "
                "(or rollout.num_workers), or run it on a cluster"
            )


def _spares(cfg: RunConfig, model: str) -> list[tuple[SpareKey, ActorSpec]]:
    """(key, spec) of each spare of `model` (keys.local_model); the learner's pad id needs the
    tokenizer (or the token cache)."""
    from cluster.driver import check_device_memory, prompt_encoder
    from cluster.warm_pool.keys import run_spares

    # A colocated run on a GPU sets vLLM's memory fraction from this plan before it starts its
    # actors: the spares must be built with the same fraction, or no run would match them.
    check_device_memory(cfg, model, print)
    return run_spares(cfg, model, prompt_encoder(cfg, model).pad_id)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
