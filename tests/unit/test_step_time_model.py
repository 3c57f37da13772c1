"""The step-time cost model on hand-computed cases (pure arithmetic; values chosen exact in binary)."""

from __future__ import annotations

import pytest

from benchmarks.step_time_model import PhaseTimes, speedup, step_time

PHASES = PhaseTimes(generate_s=8.0, reward_s=0.5, train_s=3.0, sync_s=0.5)


def test_synchronous_step_is_the_sum_of_its_phases() -> None:
    assert step_time(PHASES, workers=2, max_staleness=0) == 4.0 + 0.5 + 3.0 + 0.5
    assert speedup(PHASES, 2, 0) == 1.0


def test_async_step_is_the_slower_side() -> None:
    # rollout side 8/2 + 0.5 + 0.5 = 5.0, learner side 3 + 0.5 = 3.5
    assert step_time(PHASES, workers=2, max_staleness=1) == 5.0
    # enough workers: the learner is the bottleneck, and more staleness changes nothing
    assert step_time(PHASES, workers=8, max_staleness=1) == 3.5
    assert step_time(PHASES, workers=8, max_staleness=3) == 3.5
    assert speedup(PHASES, 8, 1) == (1.0 + 0.5 + 3.0 + 0.5) / 3.5


def test_balanced_phases_approach_the_overlap_bound() -> None:
    balanced = PhaseTimes(generate_s=1.0, reward_s=0.0, train_s=1.0, sync_s=0.0)
    assert speedup(balanced, 1, 1) == 2.0  # (gen + train) / max(gen, train)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="workers >= 1"):
        step_time(PHASES, workers=0, max_staleness=0)
