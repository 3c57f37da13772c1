"""The run's side of the warm pool (connect, claim) and the `grpo-ray warm up|down|status` verbs."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cluster.config import ConfigError, RunConfig
from cluster.ray_session import ray_address
from cluster.warm_pool.state import PoolState, alive, pool_dir, read_state

READY_TIMEOUT_S = 900.0  # `warm up` waits this long for the spares (the 7B config's engines included)
STOP_TIMEOUT_S = 30.0


@dataclass
class Adopted:
    workers: list[Any]  # RolloutWorker handles, by slot
    learner: Any  # a learner.data_parallel.LearnerGroup of one rank


_connected: list[PoolState] = []  # the pool this process's Ray session belongs to (at most one)
_leases: list[Any] = []  # held for as long as the spares are this process's (see SparePool.claim)
_notices: list[str] = []  # why a pool on record was not joined, for the run's log (take_notice)
PROBE_TIMEOUT_S = 2.0


def usable(cfg: RunConfig) -> PoolState | None:
    """The running pool, when `cfg` would start its own local Ray (no address) and allows it."""
    if not cfg.warm_pool or ray_address(cfg.ray_address) != "local":
        return None
    directory = pool_dir()
    recorded = directory is not None and (directory / "state.json").is_file()
    state = read_state()
    if state is None and recorded:
        _notices.append(
            f"the warm pool on record ({directory}/state.json) is gone (its process exited); starting cold"
        )
    return state


def connect(state: PoolState) -> bool:
    """Join the pool's Ray as this run's Ray. False (Ray not initialised, a notice kept) when it does
    not answer: its GCS port is probed first, since ray.init retries a dead address for minutes."""
    import ray

    from cluster.ray_session import connect_loopback

    if not _listening(state.address):
        _notices.append(
            f"the warm pool of '{state.config}' (pid {state.pid}) does not answer at {state.address} "
            "(its Ray stopped); starting cold. `grpo-ray warm down` clears it"
        )
        return False
    try:
        connect_loopback(state.address, log_to_driver=True)
    except Exception as err:  # a daemon stopping as we read its file: start cold instead
        if ray.is_initialized():
            ray.shutdown()
        _notices.append(f"could not join the warm pool's Ray ({type(err).__name__}); starting cold")
        return False
    _connected[:] = [state]
    return True


def take_notice() -> str | None:
    """Why this process did not join a pool it found (once), or None."""
    return _notices.pop(0) if _notices else None


def _listening(address: str) -> bool:
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S):
            return True
    except (OSError, ValueError):
        return False


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
    fresh = read_state()
    if fresh is not None and fresh.spares == 0:
        return None, "it is still starting (see `grpo-ray warm status`)"
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

    A pool already running is stopped first (one pool per user and machine), unless a run holds its
    spares. Concurrent `warm up`s take turns (a lock file). SIGINT, SIGTERM or SIGHUP while waiting
    stop the pool being started (raised as KeyboardInterrupt). Raises ConfigError when `cfg` cannot
    use a pool (a Ray address, a data-parallel learner, more resources than the machine has), a run
    holds the running pool's spares, or the pool fails to start (the daemon's error or log tail).
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
    # ... and so does a memory plan that cannot fit (the daemon applies the plan to its own copy)
    check_device_memory(cfg.model_copy(deep=True), model_path(cfg), lambda line: None)
    directory = pool_dir()
    if directory is None:
        raise ConfigError("no cache directory for the warm pool: set $GRPO_RAY_CACHE_DIR")
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "warm-up.lock", "w") as lock, _signals_interrupt():
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second `warm up` waits here, then replaces this pool
        if read_state() is not None:
            warm_down(echo)
        _start_daemon(cfg, idle_minutes, directory, echo)


def _start_daemon(cfg: RunConfig, idle_minutes: float, directory: Any, echo: Any) -> None:
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


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (a `timeout`, a closed terminal) end the wait as Ctrl-C does."""

    def interrupt(number: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _await_spares(daemon: subprocess.Popen[bytes], log: Any) -> None:
    start = time.time()
    while time.time() - start < READY_TIMEOUT_S:
        if daemon.poll() is not None:
            tail = _tail(log)
            last = tail.splitlines()[-1] if tail else ""
            if last.startswith("error: "):  # the daemon's own one-line refusal
                raise ConfigError(f"the warm pool did not start: {last.removeprefix('error: ')}")
            raise ConfigError(f"the warm pool stopped while starting; the end of {log}:\n{tail}")
        state = read_state()
        if state is not None and state.pid == daemon.pid and state.failed:
            raise ConfigError(
                "the warm pool's spares failed to start: " + "; ".join(state.failed) + f" (see {log})"
            )
        if state is not None and state.pid == daemon.pid and state.spares and state.ready == state.spares:
            return
        time.sleep(0.5)
    raise ConfigError(f"the warm pool's spares were not ready after {READY_TIMEOUT_S:.0f} s; see {log}")


def warm_down(echo: Any = print, force: bool = False) -> bool:
    """Stop the running pool (its Ray and every spare go with it); returns once its process has
    exited. False when none runs. Raises ConfigError while a run holds its spares, unless `force`
    (that run then loses its actors and stops)."""
    state = read_state()
    if state is None:
        echo("no warm pool is running")
        return False
    if state.in_use and not force:
        raise ConfigError(
            f"a run is using the warm pool of '{state.config}' (its actors live in the pool's Ray); "
            "stopping it now would end that run. Wait for the run to finish, or "
            "`grpo-ray warm down --force`"
        )
    os.kill(state.pid, signal.SIGTERM)
    deadline = time.time() + STOP_TIMEOUT_S
    while time.time() < deadline and alive(state.pid):
        time.sleep(0.2)
    if alive(state.pid):
        os.kill(state.pid, signal.SIGKILL)
    echo(f"warm pool of '{state.config}' stopped (pid {state.pid}, served {state.claims} run(s))")
    return True


def describe(state: PoolState | None) -> str:
    """`grpo-ray warm status`: one paragraph."""
    if state is None:
        return "no warm pool is running (start one with `grpo-ray warm up CONFIG`)"
    if state.spares == 0:
        use = "starting (its spares are not made yet)"
    elif state.in_use:
        use = "in use by a run"
    elif state.ready < state.spares:
        use = "building its spares"
    else:
        use = f"idle for {state.idle_s:.0f} s of {state.idle_limit_s:.0f} s"
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
