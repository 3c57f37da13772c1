"""Run directories and checkpoints (issue 16): nothing a user has is moved or lost; a corrupt newest
checkpoint is named, set aside, and the newest intact one is resumed; read-only run_root is one line."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
import torch

from cluster.checkpoint import TrainerState, complete_checkpoints, load_resume_point, save_checkpoint
from cluster.cli import main
from cluster.config import ConfigError, load_config
from cluster.run_dir import check_run_root_writable, set_aside_previous_run

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def _learner_state() -> dict[str, Any]:
    return {
        "adapter": {"base_model.model.x.lora_A.weight": torch.arange(6.0).reshape(2, 3)},
        "adapter_config": {"r": 2},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "scheduler": {"last_epoch": 3},
        "torch_rng": torch.get_rng_state(),
    }


def _three_checkpoints(run_dir: Path) -> list[Path]:
    for step in (1, 2, 3):
        save_checkpoint(
            run_dir, TrainerState(step, step, 4 * step, None), _learner_state(), "name: x\n", keep=3
        )
    return complete_checkpoints(run_dir)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda c: _truncate(c / "adapter" / "adapter_model.safetensors"), "adapter_model.safetensors"),
        (lambda c: _truncate(c / "learner_state.pt"), "learner_state.pt"),
        (lambda c: (c / "state.json").write_text(""), "state.json: JSONDecodeError"),
        (lambda c: (c / "state.json").write_text("[1]"), "state.json: not a trainer state"),
        (lambda c: (c / "config.yaml").write_text("- a"), "config.yaml: not a config mapping"),
        (lambda c: (c / "learner_state.pt").unlink(), "learner_state.pt: FileNotFoundError"),
    ],
)
def test_corrupt_newest_checkpoint_is_set_aside(tmp_path: Path, damage: Any, fragment: str) -> None:
    newest = _three_checkpoints(tmp_path)[-1]
    damage(newest)
    said: list[str] = []
    loaded = load_resume_point(tmp_path, "auto", said.append)
    assert loaded is not None
    path, state, learner_state, _ = loaded
    assert (path.name, state.step) == ("step_000002", 2)
    assert torch.equal(
        learner_state["adapter"]["base_model.model.x.lora_A.weight"], torch.arange(6.0).reshape(2, 3)
    )
    assert said[0].startswith(f"checkpoint step_000003 is corrupt ({newest}/") and fragment in said[0]
    assert "moved it to step_000003.corrupt-" in said[0]
    assert said[-1] == "resuming from step_000002, the newest intact checkpoint"
    # Nothing is deleted: the corrupt directory is kept beside the others, and no longer "complete".
    aside = [p.name for p in (tmp_path / "checkpoints").iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1 and aside[0].startswith("step_000003.corrupt-")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_000001", "step_000002"]


def test_every_checkpoint_corrupt_is_a_config_error(tmp_path: Path) -> None:
    for checkpoint in _three_checkpoints(tmp_path):
        (checkpoint / "state.json").write_text("")
    with pytest.raises(ConfigError, match=r"no intact checkpoint.*resume: never"):
        load_resume_point(tmp_path, "auto", lambda _: None)
    assert len(list((tmp_path / "checkpoints").iterdir())) == 3  # all kept, set aside


def test_explicit_corrupt_checkpoint_is_named(tmp_path: Path) -> None:
    newest = _three_checkpoints(tmp_path)[-1]
    _truncate(newest / "learner_state.pt")
    with pytest.raises(ConfigError, match=r"step_000003/learner_state\.pt: "):
        load_resume_point(tmp_path, str(newest), lambda _: None)


def test_stale_partial_directories_are_cleaned(tmp_path: Path) -> None:
    _three_checkpoints(tmp_path)
    stale = tmp_path / "checkpoints" / "step_000004.abc.partial"
    (stale / "adapter").mkdir(parents=True)
    said: list[str] = []
    loaded = load_resume_point(tmp_path, "auto", said.append)
    assert loaded is not None and loaded[0].name == "step_000003"
    assert not stale.exists()
    assert said[0].startswith(f"ignoring incomplete checkpoint {stale}")


# -- the run directory ----------------------------------------------------------------------------


def _a_run(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("name: x\n")
    (path / "metrics.jsonl").write_text("{}\n")
    return path


def test_fresh_run_moves_only_its_own_directory(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    mine, other = _a_run(root / "demo"), _a_run(root / "other")
    said: list[str] = []
    aside = set_aside_previous_run(mine, root, said.append)
    assert aside is not None and aside.parent == root and aside.name.startswith("demo.previous-")
    assert (aside / "metrics.jsonl").read_text() == "{}\n"
    assert (other / "metrics.jsonl").exists() and not mine.exists()
    # a second fresh run in the same second gets its own name
    _a_run(mine)
    second = set_aside_previous_run(mine, root, said.append)
    assert second is not None and second != aside and aside.exists()


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b"])
def test_run_dir_equal_to_or_outside_run_root_is_refused(tmp_path: Path, name: str) -> None:
    root = tmp_path / "runs"
    _a_run(root / "other")
    with pytest.raises(ConfigError, match="not one directory inside run_root"):
        set_aside_previous_run(root / name if name else root, root, lambda _: None)
    assert (root / "other" / "metrics.jsonl").exists()  # nothing moved


def test_name_empty_never_reaches_the_run_root() -> None:
    # the config refuses it before the driver could compute run_dir == run_root
    with pytest.raises(ConfigError, match="'name'"):
        load_config(DEMO, ["name="])


def test_directory_that_is_not_a_run_is_left_alone(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    (root / "demo" / "my-notes").mkdir(parents=True)
    with pytest.raises(ConfigError, match="is not a grpo-ray run directory; it is left untouched"):
        set_aside_previous_run(root / "demo", root, lambda _: None)
    assert (root / "demo" / "my-notes").is_dir()
    (root / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a grpo-ray run directory"):
        set_aside_previous_run(root / "file", root, lambda _: None)


def test_empty_or_missing_run_dir_needs_no_move(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert set_aside_previous_run(tmp_path / "empty", tmp_path, lambda _: None) is None
    assert set_aside_previous_run(tmp_path / "missing", tmp_path, lambda _: None) is None


def test_unwritable_run_root_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # /sys is not writable even for root; a real OSError from the kernel, not a fake.
    cfg = load_config(DEMO, ["run_root=/sys/grpo-ray-runs"])
    with pytest.raises(ConfigError, match=r"run_root '/sys/grpo-ray-runs': cannot write .*set run_root"):
        check_run_root_writable(cfg)
    assert main(["train", str(DEMO), "run_root=/sys/grpo-ray-runs", "steps=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run_root '/sys/grpo-ray-runs'") and len(err.strip().splitlines()) == 1


def test_read_only_filesystem_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # EROFS needs a read-only mount (root only here); the error path is the same as for /sys above.
    def read_only(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "runs"))

    monkeypatch.setattr(Path, "mkdir", read_only)
    cfg = load_config(DEMO, [f"run_root={tmp_path / 'runs'}"])
    with pytest.raises(ConfigError, match=r"cannot write \(.*runs\): the filesystem is read-only"):
        check_run_root_writable(cfg)


def test_cli_turns_a_late_read_only_error_into_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import cluster.cli

    def dispatch(args: Any) -> int:
        raise OSError(errno.EROFS, "Read-only file system", "runs/demo/metrics.jsonl")

    monkeypatch.setattr(cluster.cli, "_dispatch", dispatch)
    assert main(["check", str(DEMO)]) == 1
    err = capsys.readouterr().err
    assert (
        err
        == "error: cannot write (runs/demo/metrics.jsonl): the filesystem is read-only; free space or point run_root elsewhere\n"
    )
