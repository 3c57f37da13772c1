"""The start-up breakdown: phases on one clock, the one-line summary, startup.json, vLLM's log phases."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from cluster.telemetry.startup import StartupClock
from grpo_ray.spans import Spans
from rollout.engine_timing import engine_phases


def _clock() -> StartupClock:
    clock = StartupClock(origin=1000.0)
    clock.add("python + imports + config", 1000.0, 1000.5, cpu=0.4)
    clock.add("ray start", 1001.0, 1003.0, cpu=0.2)
    clock.add_actor(
        "engine-0",
        [
            ("process start", 1001.5, 1002.5, 0.9),
            ("build engine", 1004.0, 1006.0, 1.8),
            ("build engine/load weights", 1004.5, 1004.75, math.nan),
        ],
    )
    clock.add_actor(
        "learner", [("process start", 1001.2, 1003.0, 1.5), ("load + quantize", 1003.0, 1004.0, 1.0)]
    )
    clock.mark("first step", 1007.25)
    return clock


def test_line_names_every_process_with_phases_in_order_and_the_time_to_the_first_step() -> None:
    line = _clock().line()
    assert line.startswith("start-up 7.2 s to the first step")  # 1007.25 - 1000.0 = 7.25, shown as 7.2
    driver, learner, engine = line.split(" | ")[1:]
    # the driver first, then the actors in the order they began (learner 1001.2 before engine 1001.5)
    assert driver == "driver: python + imports + config 0.5, ray start 2.0"
    assert learner == "learner ready at 4.0 s (process start 1.8 (1.5), load + quantize 1.0 (1.0))"
    # a sub-phase is shown in brackets after its phase; the engine was ready when its build ended (1006)
    assert (
        engine
        == "engine-0 ready at 6.0 s (process start 1.0 (0.9), build engine 2.0 (1.8) [load weights 0.25])"
    )


def test_json_is_relative_to_the_origin_and_keeps_cpu_time(tmp_path: Path) -> None:
    clock = _clock()
    data = json.loads(clock.write(tmp_path).read_text())
    assert data["marks_s"] == {"first step": 7.25}
    first = data["phases"][0]
    assert first == {
        "where": "driver",
        "phase": "python + imports + config",
        "start_s": 0.0,
        "end_s": 0.5,
        "seconds": 0.5,
        "cpu_s": 0.4,
    }
    weights = next(p for p in data["phases"] if p["phase"] == "build engine/load weights")
    assert weights["cpu_s"] is None  # not measured: null, not NaN (which is not JSON)
    # top-level phases only: 0.9 + 1.8 (engine) + 1.5 + 1.0 (learner) + 0.4 + 0.2 (driver)
    assert math.isclose(clock.cpu_seconds(), 5.8)
    assert math.isclose(clock.cpu_seconds("engine-0"), 2.7)


def test_engine_phases_reads_vllms_info_records_without_printing_them() -> None:
    logger = logging.getLogger("vllm")
    printed: list[logging.LogRecord] = []

    class Console(logging.Handler):  # stands in for vLLM's own handler at VLLM_LOGGING_LEVEL=ERROR
        def emit(self, record: logging.LogRecord) -> None:
            printed.append(record)

    console = Console(logging.ERROR)
    logger.addHandler(console)
    logger.setLevel(logging.ERROR)
    spans = Spans()
    try:
        with engine_phases(spans, "build engine"):
            child = logging.getLogger("vllm.v1.worker.cpu_model_runner")
            child.info("Starting to load model %s...", "m")
            child.info("Loading weights took %.2f seconds", 0.01)
            child.info("init engine (profile, create kv cache, warmup model) took %.2f s", 0.05)
    finally:
        logger.removeHandler(console)
    assert printed == []
    assert logger.level == logging.ERROR  # restored
    names = [name for name, *_ in spans.items]
    assert names == ["build engine", "build engine/load weights", "build engine/kv cache + warm-up"]
    _, begin, end, _ = spans.items[2]
    # vLLM's own figure, ending when it was logged; epoch seconds ~1.8e9 are spaced 2.4e-7 in float64
    assert math.isclose(end - begin, 0.05, abs_tol=1e-6)


def test_engine_phases_without_vllm_records_keeps_only_the_whole_phase() -> None:
    spans = Spans()
    with engine_phases(spans, "build engine"):
        pass
    assert [name for name, *_ in spans.items] == ["build engine"]
