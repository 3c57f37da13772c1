"""`train` runs the memory check before any actor starts, for every placement whose device size is
known (split: the config's gpu_memory_gib), and refuses a plan that does not fit with check's advice."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster import driver
from cluster.config import ConfigError, load_config

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def _no_actors(*args: object, **kwargs: object) -> None:
    raise AssertionError("an actor was about to start before the memory check refused the run")


def test_split_with_a_known_gpu_size_is_refused_before_any_actor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the demo's tiny model still needs the 1 GiB CUDA context + slack on the learner's device
    cfg = load_config(DEMO, [f"run_root={tmp_path}", "placement=split", "gpu_memory_gib=0.5"])
    import ray

    # Run alone, this test's run starts Ray itself; after the integration tests (one suite, one
    # process) it finds their session's Ray. Either way the refusal leaves Ray as it found it: the
    # Ray it started is shut down, a Ray it found keeps running for whoever started it.
    ray_before = ray.is_initialized()
    monkeypatch.setattr(driver, "_open_session", _no_actors)
    printed: list[str] = []
    with pytest.raises(ConfigError) as err:
        driver.run(cfg, echo=printed.append)
    assert str(err.value).startswith("the run does not fit in 0.5 GiB:\n  the training phase needs")
    assert any("memory plan (split, device 0.50 GiB)" in line for line in printed)
    assert ray.is_initialized() == ray_before


def test_a_plan_that_fits_is_printed_and_an_unknown_size_is_not_checked() -> None:
    printed: list[str] = []
    driver.check_device_memory(
        load_config(DEMO, ["gpu_memory_gib=24"]),
        str(DEMO.parent.parent / "assets" / "tiny-qwen2"),
        printed.append,
    )
    assert len(printed) == 1 and ": fits," in printed[0]
    printed.clear()
    driver.check_device_memory(load_config(DEMO), "unused: no size, no check", printed.append)
    assert printed == []
