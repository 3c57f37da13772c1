"""max_staleness at config load: what is refused, and what the plan says."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import ConfigError, load_config
from cluster.planning.batch_plan import derive_plan

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def test_colocate_with_staleness_is_refused_naming_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"max_staleness = 1 .* placement 'colocate'"):
        load_config(DEMO, ["placement=colocate", "rollout.num_workers=1", "max_staleness=1"])
    load_config(DEMO, ["placement=colocate", "rollout.num_workers=1", "max_staleness=0"])


def test_staleness_without_importance_correction_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"learner\.loss\.tis_cap is null"):
        load_config(DEMO, ["max_staleness=2", "learner.loss.tis_cap=null"])


@pytest.mark.parametrize("bad", ["max_staleness=-1", "max_staleness=1001", "max_staleness=1.5"])
def test_bad_values_name_the_key(bad: str) -> None:
    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        load_config(DEMO, [bad])


def test_the_plan_says_how_far_ahead_the_pool_runs() -> None:
    for overrides, expected in [
        ([], "synchronous"),
        (["max_staleness=2"], "up to 2 step(s) ahead"),
    ]:
        cfg = load_config(DEMO, overrides)
        assert expected in derive_plan(cfg).render(cfg)
