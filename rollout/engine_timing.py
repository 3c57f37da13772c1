"""Where a vLLM engine's construction time goes, read from vLLM's own log records.

vLLM logs the start of model loading, the weight load time and "init engine (profile, create kv
cache, warmup model) took X s" at INFO. The rollout workers keep vLLM's console output at ERROR
(placement.worker_env), so this captures those records in memory only while `LLM(...)` is built,
without printing them. A vLLM version that words them differently just loses the sub-phases.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from grpo_ray.spans import Spans

_LOAD_START = "Starting to load model"
_WEIGHTS_DONE = "Loading weights took"
_INIT_ENGINE = "init engine (profile, create kv cache, warmup model) took"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: list[tuple[float, str, tuple]] = []

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        self.seen.append((record.created, str(record.msg), args))


@contextmanager
def engine_phases(spans: Spans, prefix: str) -> Iterator[None]:
    """Time the `with` block as `prefix`, plus its sub-phases as `prefix/load weights`, `prefix/kv cache
    + warm-up` (vLLM's profile run, KV cache allocation and warm-up) when vLLM logged them."""
    logger = logging.getLogger("vllm")
    handler = _Records()
    level = logger.level
    # Records are created at INFO for this handler only; vLLM's own handler keeps its level.
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        with spans.span(prefix):
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    _sub_phases(handler.seen, spans, prefix)


def _sub_phases(seen: list[tuple[float, str, tuple]], spans: Spans, prefix: str) -> None:
    def first(start: str) -> tuple[float, tuple] | None:
        return next(((t, args) for t, msg, args in seen if msg.startswith(start)), None)

    load, weights, init = first(_LOAD_START), first(_WEIGHTS_DONE), first(_INIT_ENGINE)
    if load is not None and weights is not None:
        spans.add(f"{prefix}/load weights", load[0], weights[0])  # CPU time unknown: NaN
    if init is not None and init[1] and isinstance(init[1][0], float):
        spans.add(f"{prefix}/kv cache + warm-up", init[0] - init[1][0], init[0])
