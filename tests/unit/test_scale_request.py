"""`grpo-ray scale RUN_DIR N`: the request file the driver polls each step, and its bad inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.cli import main
from cluster.config import ConfigError
from cluster.scale import request_pool_size, requested_pool_size


def _run_dir(tmp_path: Path) -> Path:
    run_dir = tmp_path / "demo"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("name: demo\n")
    return run_dir


def test_request_round_trips_and_nothing_requested_reads_none(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path)
    assert requested_pool_size(run_dir) == (None, None)
    assert main(["scale", str(run_dir), "3"]) == 0
    assert requested_pool_size(run_dir) == (3, None)
    request_pool_size(run_dir, 1)
    assert requested_pool_size(run_dir) == (1, None)
    assert not list(run_dir.glob("*.partial"))  # written atomically


def test_bad_requests_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _run_dir(tmp_path)
    with pytest.raises(ConfigError, match="at least one rollout worker"):
        request_pool_size(run_dir, 0)
    assert main(["scale", str(tmp_path / "nowhere"), "2"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (run_dir / "pool_size").write_text("two\n")
    workers, problem = requested_pool_size(run_dir)
    assert workers is None and problem is not None and "'two'" in problem and "grpo-ray scale" in problem
    (run_dir / "pool_size").write_text("0\n")
    assert (
        requested_pool_size(run_dir)[1]
        == f"{run_dir / 'pool_size'} asks for 0 workers; a run needs at least one"
    )
