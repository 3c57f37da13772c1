"""The run's side of the warm pool (connect, claim) and the `grpo-ray warm up|down|status` verbs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from cluster.config import ConfigError, RunConfig
from cluster.ray_session import ray_address
from cluster.warm_pool.state import PoolState, pool_dir, read_state

READY_TIMEOUT_S = 900.0  # `warm up` waits this long for the spares (the 7B config's engines included)
STOP_TIMEOUT_S = 30.0


@dataclass
class Adopted:
    workers: list[Any]  # RolloutWorker handles, by slot
    learner: Any  # a learner.data_parallel.LearnerGroup of one rank


_connected: list[PoolState] = []  # the pool this process's Ray session belongs to (at most one)
_leases: list[Any] = []  # held for as long as the spares are this process's (see SparePool.claim)


def usable(cfg: RunConfig) -> PoolState | None:
    """The running pool, when `cfg` would start its own local Ray (no address) and allows it."""
    if not cfg.warm_pool or ray_address(cfg.ray_address) != "local":
        return None
    return read_state()


def connect(state: PoolState) -> bool:
    """Join the pool's Ray as this run's Ray. False (Ray not initialised) when it does not answer."""
    import ray

    from cluster.ray_session import connect_loopback

    try:
        connect_loopback(state.address, log_to_driver=True)
    except Exception:  # a daemon stopping as we read its file: start cold instead
        if ray.is_initialized():
            ray.shutdown()
        return False
    _connected[:] = [state]
    return True


def connected() -> PoolState | None:
    """The pool this process is connected to, while its Ray session lasts."""
    import ray

    if _connected and not ray.is_initialized():
        _connected.clear()
        _leases.clear()
    return _connected[0] if _connected else None


def claim(cfg: RunConfig, model: str, pad_id: int) -> tuple[Adopted | None, str]:
    """The pool's spares for this run (adopted: this run kills them when it ends), or (None, why not).

    Call while `connected()`. Every spare's key must match the actor this run would start.
    """
    import ray

    from cluster.warm_pool.keys import local_model, run_spares
    from cluster.warm_pool.registry import NAMESPACE, POOL_NAME
    from learner.data_parallel import LearnerGroup

    try:
        wanted = [key for key, _ in run_spares(cfg, local_model(model), pad_id)]
    except ValueError as err:
        return None, str(err)
    try:
        pool = ray.get_actor(POOL_NAME, namespace=NAMESPACE)
        lease = ray.put(b"lease")  # owned by this driver: the pool takes its spares back once it is lost
        answer: Any = ray.get(pool.claim.remote(wanted, [lease]))
        handles, why = answer
    except Exception as err:  # the pool is stopping
        return None, f"it did not answer ({type(err).__name__})"
    if handles is None:
        return None, why
    _leases.append(lease)
    return Adopted(workers=handles[:-1], learner=LearnerGroup([handles[-1]], cfg.learner)), ""


def warm_up(cfg: RunConfig, idle_minutes: float, echo: Any = print) -> None:
    """Start the pool for `cfg` in the background and wait until its spares are built.

    A pool already running is stopped first (one pool per user and machine). Raises ConfigError
    when `cfg` cannot use one (a Ray address, a data-parallel learner) or the pool fails to start
    (its log's last lines in the message).
    """
    from cluster.driver import check_device_memory, model_path
    from cluster.planning.model_limits import check_model_limits
    from cluster.warm_pool.keys import run_spares

    if ray_address(cfg.ray_address) != "local":
        raise ConfigError(
            "the warm pool serves runs that start their own Ray on this machine; this config joins "
            f"the Ray at {ray_address(cfg.ray_address)} (ray_address or $RAY_ADDRESS): unset it to warm up"
        )
    try:
        run_spares(cfg, model_path(cfg), 0)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_model_limits(cfg, required=True)  # a model that cannot load fails here, not in the daemon
    check_device_memory(
        cfg.model_copy(deep=True), model_path(cfg), lambda line: None
    )  # and a plan that cannot fit
    directory = pool_dir()
    if directory is None:
        raise ConfigError("no cache directory for the warm pool: set $GRPO_RAY_CACHE_DIR")
    if read_state() is not None:
        warm_down(echo)
    directory.mkdir(parents=True, exist_ok=True)
    config_json, log = directory / "config.json", directory / "daemon.log"
    config_json.write_text(cfg.model_dump_json(indent=1))
    with open(log, "w") as out:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "cluster.warm_pool.daemon", str(config_json), str(idle_minutes * 60)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # it outlives this command and its terminal
        )
    echo(
        f"warm pool: starting {cfg.rollout.num_workers} rollout worker(s) and the learner of "
        f"'{cfg.name}' (pid {daemon.pid}, log {log})"
    )
    start = time.time()
    try:
        _await_spares(daemon, log)
    except BaseException:  # an interrupted or failed start leaves nothing running
        daemon.terminate()
        daemon.wait(STOP_TIMEOUT_S)
        raise
    echo(
        f"warm pool ready in {time.time() - start:.0f} s: `grpo-ray train` of this config on this "
        f"machine starts from it (it stops after {idle_minutes:g} min without a run, or with "
        "`grpo-ray warm down`)"
    )


def _await_spares(daemon: subprocess.Popen[bytes], log: Any) -> None:
    start = time.time()
    while time.time() - start < READY_TIMEOUT_S:
        if daemon.poll() is not None:
            raise ConfigError(f"the warm pool stopped while starting; the end of {log}:\n{_tail(log)}")
        state = read_state()
        if state is not None and state.pid == daemon.pid and state.failed:
            raise ConfigError(
                "the warm pool's spares failed to start: " + "; ".join(state.failed) + f" (see {log})"
            )
        if state is not None and state.pid == daemon.pid and state.spares and state.ready == state.spares:
            return
        time.sleep(0.5)
    raise ConfigError(f"the warm pool's spares were not ready after {READY_TIMEOUT_S:.0f} s; see {log}")


def warm_down(echo: Any = print) -> bool:
    """Stop the running pool (its Ray and every spare go with it). False when none runs."""
    state = read_state()
    if state is None:
        echo("no warm pool is running")
        return False
    os.kill(state.pid, signal.SIGTERM)
    deadline = time.time() + STOP_TIMEOUT_S
    while time.time() < deadline and read_state() is not None:
        time.sleep(0.2)
    if read_state() is not None:
        os.kill(state.pid, signal.SIGKILL)
    echo(f"warm pool of '{state.config}' stopped (pid {state.pid}, served {state.claims} run(s))")
    return True


def describe(state: PoolState | None) -> str:
    """`grpo-ray warm status`: one paragraph."""
    if state is None:
        return "no warm pool is running (start one with `grpo-ray warm up CONFIG`)"
    use = (
        "in use by a run" if state.in_use else f"idle for {state.idle_s:.0f} s of {state.idle_limit_s:.0f} s"
    )
    if state.failed:
        use += "; failed to start: " + "; ".join(state.failed)
    return (
        f"warm pool of '{state.config}': pid {state.pid}, Ray at {state.address}, "
        f"{state.ready}/{state.spares} spares built, {use}, served {state.claims} run(s); log {state.log}"
    )


def _tail(path: Any, lines: int = 15) -> str:
    try:
        return "\n".join(open(path).read().splitlines()[-lines:])
    except OSError:
        return "(no log)"
