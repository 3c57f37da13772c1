"""Checkpoint bookkeeping: atomic completeness, keep-last-K, and what a resume may not change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.checkpoint import (
    TrainerState,
    check_compatible,
    complete_checkpoints,
    find_resume_point,
    load_checkpoint,
    save_checkpoint,
)
from cluster.config import ConfigError, load_config

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def _learner_state() -> dict:
    return {
        "adapter": {"base_model.model.x.lora_A.weight": torch.arange(6.0).reshape(2, 3)},
        "adapter_config": {"r": 2},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "scheduler": {"last_epoch": 3},
        "torch_rng": torch.get_rng_state(),
    }


def test_save_load_round_trip_and_keep_last(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        save_checkpoint(
            tmp_path, TrainerState(step, step, 16 * step, 0.4), _learner_state(), "name: x\n", keep=2
        )
    kept = complete_checkpoints(tmp_path)
    assert [p.name for p in kept] == ["step_000002", "step_000003"]
    state, learner, saved = load_checkpoint(kept[-1])
    assert state == TrainerState(3, 3, 48, 0.4)
    assert torch.equal(
        learner["adapter"]["base_model.model.x.lora_A.weight"], torch.arange(6.0).reshape(2, 3)
    )
    assert learner["scheduler"] == {"last_epoch": 3} and saved == {"name": "x"}


def test_partial_checkpoints_are_ignored(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, TrainerState(1, 1, 16, None), _learner_state(), "{}", keep=3)
    (tmp_path / "checkpoints" / "step_000002.abc.partial").mkdir()
    (tmp_path / "checkpoints" / "step_000003").mkdir()  # no state.json: never completed
    messages: list[str] = []
    assert find_resume_point(tmp_path, "auto", messages.append) == tmp_path / "checkpoints" / "step_000001"
    assert any("ignoring incomplete checkpoint" in m for m in messages)


def test_resume_auto_without_checkpoints_starts_fresh(tmp_path: Path) -> None:
    messages: list[str] = []
    assert find_resume_point(tmp_path, "auto", messages.append) is None
    assert "starting from scratch" in messages[0]
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        find_resume_point(tmp_path, str(tmp_path / "nope"), messages.append)


def test_changing_frozen_settings_is_refused_with_every_key() -> None:
    saved = load_config(DEMO).model_dump(mode="json")
    changed = load_config(
        DEMO, ["learner.lora.rank=8", "model=other/model", "rollout.num_workers=1", "steps=50"]
    )
    with pytest.raises(ConfigError) as err:
        check_compatible(saved, changed)
    message = str(err.value)
    assert "learner.lora.rank: checkpoint 16 -> now 8" in message and "model:" in message
    assert "num_workers" not in message and "steps" not in message  # these may change on resume
    check_compatible(saved, load_config(DEMO, ["rollout.num_workers=1", "steps=50"]))
