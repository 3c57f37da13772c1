"""The benchmark's time-to-+15-points rule, on hand-made accuracy curves."""

from __future__ import annotations

from benchmarks.time_to_accuracy import time_to_gain


def test_first_evaluation_at_or_above_step_zero_plus_the_gain() -> None:
    curve = [
        {"step": 0, "t_s": 10.0, "accuracy": 0.50},
        {"step": 2, "t_s": 12.0, "accuracy": 0.60},
        {"step": 4, "t_s": 14.0, "accuracy": 0.65},  # 0.50 + 0.15 exactly: counts
        {"step": 6, "t_s": 16.0, "accuracy": 0.70},
    ]
    assert time_to_gain(curve) == 14.0


def test_never_reached_is_none_and_a_dip_does_not_matter() -> None:
    curve = [
        {"step": 0, "t_s": 5.0, "accuracy": 0.40},
        {"step": 2, "t_s": 7.0, "accuracy": 0.30},
        {"step": 4, "t_s": 9.0, "accuracy": 0.54},
    ]
    assert time_to_gain(curve) is None
    assert time_to_gain(curve, gain=0.10) == 9.0
