"""The warm pool's process: `python -m cluster.warm_pool.daemon CONFIG_JSON IDLE_LIMIT_S`.

Started by `grpo-ray warm up` in its own session (it outlives the command). It starts a local Ray
(loopback only, cluster/ray_session.py), the SparePool actor with one spare per actor of a run of
the config, and rewrites the state file every second. It stops on SIGTERM (`grpo-ray warm down`),
SIGINT, or after IDLE_LIMIT_S seconds without a run; its Ray, and every spare with it, stops then.
"""

from __future__ import annotations

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
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, _frame: stopping.append(number))

    import ray

    from cluster.config import RunConfig
    from cluster.ray_session import init_ray
    from cluster.warm_pool.registry import NAMESPACE, POOL_NAME, SparePool
    from cluster.warm_pool.state import PoolState, remove_state, write_state

    cfg = RunConfig.model_validate_json(config_json.read_text())
    init_ray(None, log_to_driver=False)
    pid = os.getpid()
    try:
        spares = _spares(cfg)
        pool: Any = (
            ray.remote(SparePool)
            .options(name=POOL_NAME, namespace=NAMESPACE, lifetime="detached", num_cpus=0)
            .remote(spares)
        )
        state = PoolState(
            pid=pid,
            address=ray.get_runtime_context().gcs_address,
            config=cfg.name,
            config_path=str(config_json),
            log=str(config_json.with_name("daemon.log")),
            started=time.time(),
            spares=len(spares),
            idle_limit_s=idle_limit_s,
        )
        while not stopping:
            status = ray.get(pool.status.remote())
            state.ready, state.in_use, state.failed = status["ready"], status["in_use"], status["failed"]
            state.claims, state.idle_s = status["claims"], status["idle_s"]
            write_state(state)
            if state.idle_s > idle_limit_s:
                print(f"no run for {idle_limit_s:.0f} s: stopping the warm pool", flush=True)
                break
            time.sleep(STATUS_INTERVAL_S)
    finally:
        remove_state(pid)
        ray.shutdown()
    return 0


def _spares(cfg: RunConfig) -> list[tuple[SpareKey, ActorSpec]]:
    """(key, spec) of each spare; the learner's pad id needs the tokenizer (or the token cache)."""
    from cluster.driver import check_device_memory, model_path, prompt_encoder
    from cluster.warm_pool.keys import local_model, run_spares

    model = local_model(model_path(cfg))
    # A colocated run on a GPU sets vLLM's memory fraction from this plan before it starts its
    # actors: the spares must be built with the same fraction, or no run would match them.
    check_device_memory(cfg, model, print)
    return run_spares(cfg, model, prompt_encoder(cfg, model).pad_id)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
