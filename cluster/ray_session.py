"""Connecting the driver to Ray: the configured cluster, or a new local Ray reachable from this machine only.

A new local Ray (no `ray_address`, no $RAY_ADDRESS) binds every process (GCS, raylet, workers, agents)
to 127.0.0.1 and keeps Ray 2.60's token authentication on. On Linux Ray otherwise binds its gRPC servers
to all interfaces ("::"), so anyone on the network could reach the GCS. Ray picks loopback-only
itself where it does not support clusters (macOS, Windows); `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` asks
for that behaviour on Linux: the node's IP becomes 127.0.0.1 and every process binds to it (measured:
tests/integration/test_ray_loopback.py lists the listening sockets of the processes started).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Read by ray._private.ray_constants at import, and by each Ray process this driver starts.
_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK = "127.0.0.1"


def ray_address(configured: str | None) -> str:
    """Where to connect: the config's address, else $RAY_ADDRESS (inside `ray job submit`), else "local".

    ray.init() alone would join whatever Ray instance happens to run on this machine; "local" always
    starts a new one.
    """
    return configured or os.environ.get("RAY_ADDRESS") or "local"


def init_ray(configured_address: str | None, **kwargs: Any) -> str:
    """ray.init for a run; returns the address used. A new local Ray listens on loopback only.

    `kwargs` go to ray.init (log_to_driver, logging_level, ...). Token authentication stays on: Ray
    2.60 enables it for a new local cluster (and refreshes its cached config) unless RAY_AUTH_MODE is
    set; setting the variable ourselves after `import ray` would leave the driver's cached mode stale.
    """
    address = ray_address(configured_address)
    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("logging_level", logging.WARNING)
    if address != "local":
        import ray

        ray.init(address=address, **kwargs)
        return address
    with _single_node():
        import ray

        ray.init(
            address=address,
            _node_ip_address=LOOPBACK,
            dashboard_host=LOOPBACK,
            # Ray would prestart one idle worker per CPU for the first driver; every actor of a run
            # has its own runtime_env, so none could use them: they only take CPU from the actors'
            # start (their imports) on a small machine.
            _system_config={"prestart_worker_first_driver": False},
            **kwargs,
        )
    return address


def connect_loopback(address: str, **kwargs: Any) -> None:
    """ray.init onto a Ray another process started with `init_ray(None)` on this machine (the warm
    pool's, cluster/warm_pool): its node address is 127.0.0.1, so this driver must use it too, and
    its token (Ray's ~/.ray/auth_token) when that Ray has token authentication on."""
    kwargs.setdefault("logging_level", logging.WARNING)
    with _single_node():
        import ray
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )

        # It warns that token authentication is on: it is, as for every local Ray this project starts.
        setup_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
        level = setup_log.level
        setup_log.setLevel(logging.ERROR)
        try:
            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        finally:
            setup_log.setLevel(level)
        ray.init(address=address, _node_ip_address=LOOPBACK, **kwargs)


@contextmanager
def _single_node() -> Iterator[None]:
    """Ray's loopback-only mode for what starts (or connects) inside the block, then as before."""
    before = os.environ.get(_SINGLE_NODE_ENV)
    os.environ[_SINGLE_NODE_ENV] = "0"  # inherited by the GCS, raylet and (through it) every worker
    from ray._private import ray_constants

    enabled = ray_constants.ENABLE_RAY_CLUSTER  # read at import: ray may have been imported already
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:  # only the processes started here are single-node; a later ray.init(address=...) is not
        ray_constants.ENABLE_RAY_CLUSTER = enabled
        if before is None:
            os.environ.pop(_SINGLE_NODE_ENV, None)
        else:
            os.environ[_SINGLE_NODE_ENV] = before
