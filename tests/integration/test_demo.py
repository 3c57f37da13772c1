"""The README's demo: configs/demo.yaml must raise held-out greedy accuracy by >= 15 points."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.driver import run

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_improves_held_out_accuracy(tmp_path: Path, ray_session: None, tiny_model: Path) -> None:
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml", [f"run_root={tmp_path}"])
    lines: list[str] = []
    result = run(cfg, echo=lines.append)
    print("\n".join(lines))  # the wall time is reported (pytest -s / -rA), not asserted
    assert result.accuracy_before is not None and result.accuracy_after is not None
    # The README's contract, a cross-machine claim about a stochastic run: measured 0.50 -> 0.95 here.
    # Another CPU samples other tokens from the first near-tied draw on and follows another trajectory;
    # evaluating 300 rows alone spreads a gain by sqrt(2·0.25/300) = 0.04 (1 sd), so 0.15 sits 7 sd
    # below the measured +0.45 (the spread between whole runs was not measured). Not `numeric`: the
    # 30-step run would cost the second CI pass minutes it does not have.
    assert result.accuracy_after - result.accuracy_before >= 0.15, lines[-1]
    assert lines[-1].startswith("held-out accuracy: ")
