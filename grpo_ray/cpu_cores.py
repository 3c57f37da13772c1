"""Pinning an actor's process to CPU cores, for resource-fair CPU runs (benchmarks/async_overlap.py).

cluster/placement.py puts the cores a config asks for into the actor's environment
(`GRPO_RAY_CPU_CORES`, e.g. "0" or "2,3"); the actor calls `pin_from_env()` first thing, so the
threads torch and OpenMP start later inherit the mask. Linux only; unset means no pinning.
"""

from __future__ import annotations

import os

ENV = "GRPO_RAY_CPU_CORES"


def cores_env(cores: list[int] | None) -> dict[str, str]:
    """The environment entry that pins an actor to `cores` (empty when None)."""
    return {} if cores is None else {ENV: ",".join(str(c) for c in cores)}


def pin_from_env() -> list[int] | None:
    """Pin this process to the cores in GRPO_RAY_CPU_CORES; returns them (None: not set).

    Raises RuntimeError naming the cores when this machine does not have them.
    """
    text = os.environ.get(ENV, "").strip()
    if not text:
        return None
    cores = sorted({int(part) for part in text.split(",") if part.strip()})
    try:
        # Every thread that exists now (a thread's mask is its own; threads started later inherit it).
        for tid in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(tid), cores)
    except (OSError, ValueError) as err:
        raise RuntimeError(
            f"cannot pin to CPU cores {cores} ({err}); this machine has cores "
            f"{sorted(os.sched_getaffinity(0))}: fix rollout.cpu_cores / learner.cpu_cores"
        ) from None
    return cores
