"""The warm pool's state file: where its Ray listens, which process owns it, how its spares are.

One pool per user and machine, at cache_root()/warm-pool/state.json (grpo_ray/cache_dir.py). The
daemon rewrites it every second; a file whose process is gone is stale and is removed when read.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from grpo_ray.cache_dir import cache_root


@dataclass
class PoolState:
    pid: int  # the daemon: it owns the pool's Ray, which stops with it
    address: str  # the Ray GCS address, 127.0.0.1:PORT
    config: str  # the config's name (its `name:`)
    config_path: str  # the resolved config the spares were made from (JSON)
    log: str  # the daemon's output
    started: float  # epoch seconds
    spares: int = 0  # 0 while the daemon is still starting (its Ray is up, its spares not yet made)
    ready: int = 0  # spares whose constructor has finished
    failed: list[str] = field(default_factory=list)  # 'role: error' of spares that failed to start
    in_use: bool = False
    claims: int = 0  # runs served so far
    idle_s: float = 0.0  # since the last run released its spares (0 while one holds them)
    idle_limit_s: float = 0.0  # the daemon stops after this long without a run


def pool_dir() -> Path | None:
    root = cache_root()
    return None if root is None else root / "warm-pool"


def read_state() -> PoolState | None:
    """The running pool's state; None when there is none (no file, or its process is gone)."""
    directory = pool_dir()
    path = directory / "state.json" if directory is not None else None
    if path is None or not path.is_file():
        return None
    try:
        state = PoolState(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):  # torn or from another version: as good as none
        return None
    if not isinstance(state.pid, int) or isinstance(state.pid, bool) or not isinstance(state.address, str):
        return None  # hand-edited or foreign: nothing this project wrote
    if not _alive(state.pid):
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    return state


def alive(pid: int) -> bool:
    """Whether the warm pool daemon `pid` still runs."""
    return _alive(pid)


def write_state(state: PoolState) -> None:
    directory = pool_dir()
    assert directory is not None, "the daemon is only started with a cache directory"
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".state.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(asdict(state), indent=1))
    os.replace(tmp, directory / "state.json")  # readers see the old state or the new, never half


def remove_state(pid: int) -> None:
    """Remove the state file if it is still `pid`'s (a newer pool may have replaced it)."""
    directory = pool_dir()
    if directory is None:
        return
    path = directory / "state.json"
    with contextlib.suppress(OSError, ValueError, TypeError):
        if json.loads(path.read_text())["pid"] == pid:
            path.unlink()


def _alive(pid: int) -> bool:
    """Whether `pid` is still a warm pool daemon (not just any process that reused the number)."""
    if pid <= 0:  # 0 and negatives name process groups, not a process
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError, OverflowError):  # gone, someone else's, or no pid
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        return b"cluster.warm_pool.daemon" in cmdline.read_bytes()
    except OSError:  # no /proc (macOS): the signal check above is all there is
        return not cmdline.parent.parent.is_dir()
