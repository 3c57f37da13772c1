"""Warm pool keys: a spare matches exactly the runs whose actor it is, and a mismatch says why."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.warm_pool.keys import mismatch, model_digest, run_spares
from cluster.warm_pool.state import PoolState, read_state, write_state

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def _keys(*overrides: str, model: str = "assets/tiny-qwen2", pad_id: int = 0) -> list[dict[str, str]]:
    return [key for key, _ in run_spares(load_config(DEMO, list(overrides)), model, pad_id)]


def test_run_settings_no_actor_sees_leave_the_keys_alone() -> None:
    # name, steps, run_root, eval cadence: the driver's business; a pool made for 30 steps serves 2.
    assert _keys() == _keys("name=other", "steps=2", "run_root=/elsewhere", "eval_every=5")


def test_a_setting_changes_the_key_of_the_actors_that_see_it_and_no_other() -> None:
    base = _keys()
    assert [k["role"] for k in base] == ["rollout-0", "rollout-1", "learner"]
    engine = _keys("rollout.kv_cache_mb=64")
    assert [a["actor"] != b["actor"] for a, b in zip(base, engine, strict=True)] == [True, True, False]
    learner = _keys("learner.learning_rate=1e-3")
    assert [a["actor"] != b["actor"] for a, b in zip(base, learner, strict=True)] == [False, False, True]
    assert _keys(pad_id=1)[-1]["actor"] != base[-1]["actor"]  # the learner's pad id is an argument too
    seed = _keys("seed=1")
    assert all(a["actor"] != b["actor"] for a, b in zip(base, seed, strict=True))  # engine seeds, LoRA init


def test_a_mismatch_names_what_differs() -> None:
    base = _keys()
    assert mismatch(base, base) is None
    assert mismatch(base, _keys("rollout.num_workers=1")) == (
        "it holds rollout-0, rollout-1, learner; this run starts rollout-0, learner"
    )
    assert mismatch(base, _keys("learner.learning_rate=1e-3")) == (
        "this run's settings differ from the config it was warmed up with (learner: "
        "learner.learning_rate 0.002 in the pool, 0.001 here): warm up with this run's config to use the pool"
    )
    assert mismatch(base, _keys("rollout.sampling.temperature=0.7")) == (
        "this run's settings differ from the config it was warmed up with (rollout-0, rollout-1, learner: "
        "rollout.sampling.temperature 1.0 in the pool, 0.7 here): warm up with this run's config to use the pool"
    )
    edited = [dict(k, code="0" * 64) for k in base]
    assert mismatch(base, edited) == (
        "the project's code or its packages changed since it was warmed up (rollout-0, rollout-1, learner)"
    )


def test_the_model_key_follows_the_model_directorys_files(tmp_path: Path, tiny_model: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    before = model_digest(str(copy))
    assert model_digest(str(copy)) == before
    config = copy / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 1_000_000_000))
    assert model_digest(str(copy)) != before  # rebuilt or re-downloaded files: the spares are stale
    assert model_digest("Qwen/Qwen2.5-0.5B") != model_digest("Qwen/Qwen2.5-1.5B")


def test_a_data_parallel_learner_has_no_spare() -> None:
    cfg = load_config(DEMO, ["learner.num_gpus=2"])
    with pytest.raises(ValueError, match="the warm pool holds one learner"):
        run_spares(cfg, "assets/tiny-qwen2", 0)


def _state(pid: int) -> PoolState:
    return PoolState(pid=pid, address="127.0.0.1:1", config="demo", config_path="", log="", started=0.0)


def test_a_state_file_whose_daemon_is_gone_is_removed_when_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRPO_RAY_CACHE_DIR", str(tmp_path))
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    write_state(_state(int(gone.stdout)))
    assert read_state() is None
    assert not (tmp_path / "warm-pool" / "state.json").exists()
    # A live process that is not a warm pool daemon (the number was reused): not a pool either.
    write_state(_state(os.getpid()))
    assert read_state() is None
    # Hand-edited pids: not a pool, and no traceback in status, down or train.
    for pid in ("abc", 1.5, 99999999999, -1, 0, True):
        (tmp_path / "warm-pool" / "state.json").write_text(json.dumps({**asdict(_state(1)), "pid": pid}))
        assert read_state() is None, pid


def test_a_pool_whose_ray_is_gone_is_not_joined_and_the_run_is_told(monkeypatch: pytest.MonkeyPatch) -> None:
    # ray.init on an address nothing listens at retries for minutes: the port is probed first.
    from cluster.warm_pool import client

    assert not client.connect(_state(os.getpid()))  # 127.0.0.1:1: nothing listens there
    notice = client.take_notice()
    assert notice is not None and notice.startswith("the warm pool of 'demo' (pid ")
    assert "does not answer at 127.0.0.1:1 (its Ray stopped); starting cold" in notice
    assert client.take_notice() is None


def test_idle_minutes_must_be_a_positive_number(capsys: pytest.CaptureFixture[str]) -> None:
    from cluster.cli import main

    for value in ("nan", "0", "-5"):
        assert main(["warm", "up", "demo", "--idle-minutes", value]) == 2
        assert "--idle-minutes must be a number above 0 (inf: never)" in capsys.readouterr().err


def test_spares_for_a_colocated_gpu_run_get_the_memory_fraction_the_run_sets(
    monkeypatch: pytest.MonkeyPatch, tiny_model: Path
) -> None:
    # A colocated run on a GPU replaces rollout.gpu_memory_utilization with its memory plan's value
    # before starting actors; spares built from the config as loaded would never match it. The GPU
    # is simulated (24 GiB): what is checked is which config the keys are computed from.
    import torch

    from cluster import driver
    from cluster.warm_pool import daemon

    class Device:
        total_memory = 24 * 2**30

    monkeypatch.setattr(driver, "_local_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Device())
    overrides = ["placement=colocate", "rollout.num_workers=1", "rollout.gpu_memory_utilization=0.9"]
    model = str(tiny_model.resolve())
    spares = daemon._spares(load_config(DEMO, overrides), model)
    run_cfg = load_config(DEMO, overrides)
    driver.check_device_memory(run_cfg, model, lambda line: None)
    assert run_cfg.rollout.gpu_memory_utilization != 0.9  # the plan did change it
    pad_id = spares[-1][1].args[-1]
    assert [key for key, _ in spares] == [key for key, _ in run_spares(run_cfg, model, pad_id)]
