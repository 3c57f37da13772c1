"""Named wall-clock intervals of one process's start-up, recorded where they happen and sent to the driver.

Times are epoch seconds (`time.time()`), so intervals from different processes on one machine line up
on one axis (across nodes they are as good as the nodes' clock sync). Each span also carries the CPU
time its process used meanwhile (all threads): on a shared machine the wall time says how long one
waited, the CPU time what the phase itself costs. The driver turns them into the start-up breakdown
(cluster/telemetry/startup.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

Span = tuple[
    str, float, float, float
]  # (name, begin, end, cpu): epoch seconds, and this process's CPU seconds


def process_cpu_so_far() -> float:
    """CPU seconds this process has used since it started (all threads)."""
    return time.process_time()


def process_start_time() -> float:
    """When this OS process was created (epoch seconds): the interpreter's own start-up counts too."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # psutil missing or /proc unreadable: fall back to "now", losing only the boot time
        return time.time()


@contextmanager
def imports_without_gc() -> Iterator[None]:
    """Import heavy libraries (torch, transformers, vLLM) with the cyclic GC paused, then freeze them.

    These imports allocate millions of long-lived objects; automatic collections during them scan
    those again and again (~20% of vLLM's import CPU time here), and every later full collection
    (vLLM calls `gc.collect()` while building an engine) would scan them once more. Frozen objects
    are never collected, which is what module-level objects are anyway.
    """
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


class Spans:
    """An append-only list of `Span`s; `span(name)` times a `with` block."""

    def __init__(self) -> None:
        self.items: list[Span] = []

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        begin, cpu = time.time(), time.process_time()
        try:
            yield
        finally:
            self.items.append((name, begin, time.time(), time.process_time() - cpu))

    def add(self, name: str, begin: float, end: float, cpu: float = float("nan")) -> None:
        self.items.append((name, begin, end, cpu))
