"""RewardScorer failure modes, end to end with real worker processes.

The reward functions live in ``tests/reward_fixtures.py``; the workers import them by path
(``reward_fixtures:raises``), which works only because the scorer hands the trainer's ``sys.path`` to
its workers. Starting workers is the slow part (~0.5-1 s each), so most tests share one scorer whose
terms misbehave only on rows that ask for it.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rewards import (
    RewardConfigError,
    RewardError,
    RewardFailure,
    RewardsConfig,
    RewardScorer,
    RewardTerm,
    ScoreResult,
)
from rewards.base import MASK_REASONS

TESTS_DIR = str(Path(__file__).resolve().parents[1])
TIMEOUT_S = 0.5

# label -> (function, weight, kwargs). Combined reward of a well-behaved sample c:
# 0.5*len(c) + 2*3 + 1*1 + 0*1 + 1*1 + 1*0.5 + 1*1 = 0.5*len(c) + 9.5
SHARED_TERMS: dict[str, tuple[str, float, dict[str, Any]]] = {
    "len": ("reward_fixtures:length", 0.5, {}),
    "scaled": ("reward_fixtures:scaled", 2.0, {"factor": 3.0}),
    "echo": ("reward_fixtures:echo", 1.0, {}),
    "logged": ("reward_fixtures:echo", 0.0, {"field": "logged"}),
    "raises": ("reward_fixtures:raises", 1.0, {}),
    "hangs": ("reward_fixtures:hangs", 1.0, {}),
    "crashes": ("reward_fixtures:crashes", 1.0, {}),
}


def _config(terms: dict[str, tuple[str, float, dict[str, Any]]], **limits: Any) -> RewardsConfig:
    return RewardsConfig.model_validate(
        {
            "terms": [
                {"function": f, "weight": w, "kwargs": kw, "name": name} for name, (f, w, kw) in terms.items()
            ],
            "timeout_s": TIMEOUT_S,
            **limits,
        }
    )


def _rows(n: int, **special: dict[str, Any]) -> list[dict[str, Any]]:
    """n rows with gold "1"; ``special={"2": {...}}`` adds fields to row 2."""
    rows: list[dict[str, Any]] = [{"gold": "1"} for _ in range(n)]
    for index, fields in special.items():
        rows[int(index)].update(fields)
    return rows


@pytest.fixture(scope="module")
def fixtures_on_path() -> Iterator[None]:
    sys.path.insert(0, TESTS_DIR)
    yield
    sys.path.remove(TESTS_DIR)


@pytest.fixture(scope="module")
def scorer(fixtures_on_path: None) -> Iterator[RewardScorer]:
    with RewardScorer(_config(SHARED_TERMS, max_masked_fraction=1.0, num_workers=2)) as shared:
        yield shared


def _masked(result: ScoreResult, label: str) -> dict[int, str]:
    return {i: r for i, r in enumerate(result.mask_reasons[label]) if r is not None}


# --------------------------------------------------------------------------------------------------
# The shared scorer: scoring, combining, masking
# --------------------------------------------------------------------------------------------------


def test_weights_combine_and_kwargs_reach_the_function(scorer: RewardScorer) -> None:
    completions = ["ab", "abcd", "", "x" * 10]
    result = scorer.score(completions, _rows(4))
    assert result.per_term["len"] == [2.0, 4.0, 0.0, 10.0]
    assert result.per_term["scaled"] == [3.0] * 4
    # Python float arithmetic (weights times term values, summed), identical on every machine; the
    # sums of a few terms round by ~1e-16, far inside approx's default rel=1e-6
    assert result.rewards == [pytest.approx(0.5 * len(c) + 9.5) for c in completions]
    assert result.masked == [False] * 4


def test_metrics_per_term(scorer: RewardScorer) -> None:
    result = scorer.score(["ab", "abcd"], _rows(2))
    for label in SHARED_TERMS:
        for key in ("mean", "std", "time_s", "masked", *(f"masked_{r}" for r in MASK_REASONS)):
            assert f"reward/{label}/{key}" in result.metrics, key
    assert result.metrics["reward/len/mean"] == 3.0  # (2 + 4) / 2
    assert result.metrics["reward/len/std"] == 1.0  # population std of {2, 4}
    assert result.metrics["reward/len/masked"] == 0.0
    assert result.metrics["reward/masked_fraction"] == 0.0
    assert result.metrics["reward/masked"] == 0.0
    assert result.metrics["reward/time_s"] > 0


def test_exception_masks_only_its_sample(scorer: RewardScorer) -> None:
    result = scorer.score(["a"] * 4, _rows(4, **{"1": {"raise": True}}))
    assert result.per_term["raises"] == [
        1.0,
        None,
        1.0,
        1.0,
    ]  # the batch call failed; the others were retried
    assert _masked(result, "raises") == {1: "exception"}
    assert result.masked == [False, True, False, False]
    assert result.metrics["reward/raises/masked_exception"] == 1.0
    assert result.metrics["reward/masked_fraction"] == 0.25


def test_type_error_inside_the_function_is_a_sample_failure_not_a_signature_error(
    scorer: RewardScorer,
) -> None:
    result = scorer.score(["a", "b"], _rows(2, **{"0": {"raise": "type"}}))
    assert _masked(result, "raises") == {0: "exception"}


def test_none_nan_inf_and_non_numbers_are_masked_never_zero(scorer: RewardScorer) -> None:
    values: list[Any] = [None, math.nan, math.inf, -math.inf, "1.0", [1.0], 2, True, 0.25]
    rows = [{"gold": "1", "value": v} for v in values]
    result = scorer.score(["a"] * len(values), rows)
    assert result.per_term["echo"] == [None, None, None, None, None, None, 2.0, 1.0, 0.25]
    assert result.mask_reasons["echo"][:6] == ["none", "nan", "inf", "inf", "non_numeric", "non_numeric"]
    assert result.masked == [True] * 6 + [False] * 3
    metrics = result.metrics
    assert [metrics[f"reward/echo/masked_{r}"] for r in ("none", "nan", "inf", "non_numeric")] == [1, 1, 2, 2]
    assert metrics["reward/echo/masked"] == 6.0
    assert metrics["reward/echo/mean"] == pytest.approx((2 + 1 + 0.25) / 3)  # Python floats: ~1e-16 off


def test_a_weight_zero_term_is_logged_but_cannot_mask(scorer: RewardScorer) -> None:
    result = scorer.score(["a", "b"], _rows(2, **{"0": {"logged": None}}))
    assert _masked(result, "logged") == {0: "none"}
    assert result.masked == [False, False]


def test_only_runs_the_named_terms(scorer: RewardScorer) -> None:
    # "hangs" would time out on row 0 if it ran; with only=["len"] it is never called.
    result = scorer.score(["ab", "abcd"], _rows(2, **{"0": {"hang": True}}), only=["len"])
    assert list(result.per_term) == ["len"]
    assert result.per_term["len"] == [2.0, 4.0]
    assert result.rewards == [1.0, 2.0]  # 0.5 * len: the combined reward of the selected terms
    assert result.metrics["reward/time_s"] < TIMEOUT_S
    with pytest.raises(ValueError, match=r"names no configured term: \['nope'\]"):
        scorer.score(["a"], _rows(1), only=["nope"])


def test_a_hanging_sample_times_out_and_training_goes_on(scorer: RewardScorer) -> None:
    start = time.monotonic()
    result = scorer.score(["a"] * 4, _rows(4, **{"1": {"hang": True}}))
    elapsed = time.monotonic() - start
    assert _masked(result, "hangs") == {1: "timeout"}
    assert result.per_term["hangs"] == [0.5, None, 0.5, 0.5]
    assert result.masked == [False, True, False, False]
    # Its chunk (2 samples) gets 2 × 0.5 s, then the hanging sample alone 0.5 s, plus worker restarts.
    assert 1.5 <= elapsed < 10.0
    assert result.metrics["reward/worker_restarts"] == 2.0
    # The killed workers were replaced: the pool still scores.
    again = scorer.score(["a", "b"], _rows(2))
    assert again.masked == [False, False]


def test_a_crashing_worker_masks_its_sample_and_is_replaced(scorer: RewardScorer) -> None:
    result = scorer.score(["a"] * 3, _rows(3, **{"2": {"crash": True}}))
    assert _masked(result, "crashes") == {2: "exception"}
    assert result.per_term["crashes"] == [1.0, 1.0, None]
    assert scorer.score(["a"], _rows(1)).masked == [False]


def test_called_from_a_thread(scorer: RewardScorer) -> None:
    results: list[ScoreResult] = []
    thread = threading.Thread(target=lambda: results.append(scorer.score(["ab"], _rows(1))))
    thread.start()
    thread.join(30)
    assert results[0].rewards == [pytest.approx(10.5)]  # Python floats: exact here (0.5·2 + 9.5)


def test_empty_batch_and_mismatched_lengths(scorer: RewardScorer) -> None:
    result = scorer.score([], [])
    assert result.rewards == [] and result.per_term["len"] == []
    assert result.metrics["reward/masked_fraction"] == 0.0
    with pytest.raises(ValueError, match="2 completions but 1 rows"):
        scorer.score(["a", "b"], _rows(1))


# --------------------------------------------------------------------------------------------------
# Configuration bugs: RewardError on the first call, RewardConfigError at start
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("reward_fixtures:wrong_length", r"returned a list of length 3 for 2 completions"),
        ("reward_fixtures:not_a_list", r"returned a float \(1.0\)"),
        ("reward_fixtures:one_arg", r"cannot be called with \(completions, rows, \*\*\{\}\)"),
        ("reward_fixtures:scaled", r"\*\*\{'fator': 3\}\): got an unexpected keyword argument 'fator'"),
    ],
)
def test_configuration_bugs_stop_the_run(fixtures_on_path: None, function: str, message: str) -> None:
    kwargs = {"fator": 3} if function.endswith("scaled") else {}
    with RewardScorer(_config({"bad": (function, 1.0, kwargs)})) as bad:
        with pytest.raises(RewardError, match=message) as err:
            bad.score(["a", "b"], _rows(2))
        assert not isinstance(err.value, RewardFailure)
        assert function in str(err.value) and "fn(completions: list[str], rows" in str(err.value)


def test_unimportable_reward_fails_at_start(fixtures_on_path: None) -> None:
    with pytest.raises(RewardConfigError, match="module 'no_such_reward_module' not found"):
        RewardScorer(_config({"x": ("no_such_reward_module:score", 1.0, {})}))
    with pytest.raises(RewardConfigError, match="is a int, not a function"):
        RewardScorer(_config({"x": ("reward_fixtures:NOT_CALLABLE", 1.0, {})}))


# --------------------------------------------------------------------------------------------------
# Too many masked samples: RewardFailure with an example
# --------------------------------------------------------------------------------------------------


def test_masked_fraction_over_threshold_raises_with_an_example(fixtures_on_path: None) -> None:
    long_completion = "Let me think step by step. " * 20  # 540 characters
    with RewardScorer(_config({"server": ("reward_fixtures:always_raises", 1.0, {})})) as failing:
        with pytest.raises(RewardFailure) as err:
            failing.score([long_completion] * 4, [{"gold": "42"}] * 4)
        message = str(err.value)
        assert "reward 'server' (function 'reward_fixtures:always_raises')" in message
        assert "rewards.max_masked_fraction=0.5" in message
        assert "reasons: exception=3" in message  # stopped as soon as 3 of 4 (> 50%) had failed
        assert "stopped early with 1 sample(s) not yet scored" in message
        assert repr(long_completion[:200])[:-1] in message and "[540 chars]" in message
        assert long_completion not in message
        assert "gold: '42'" in message
        assert "RuntimeError: the reward server is down" in message
        assert 'reward_fixtures.py", line' in message  # the traceback came back from the worker
        assert "rewards.timeout_s" in message
        # The pool survived the failure.
        with pytest.raises(RewardFailure):
            failing.score(["a"], [{"gold": "1"}])
    with pytest.raises(RewardError, match="closed"):
        failing.score(["a"], [{"gold": "1"}])


def test_math_verify_runs_in_the_worker_main_thread() -> None:
    """math_verify times itself out with signal.alarm; that works in the worker's main thread."""
    with RewardScorer(RewardsConfig(terms=[RewardTerm(function="math_verify")], timeout_s=30)) as scorer:
        result = scorer.score(
            [r"So \boxed{\frac{1}{2}}", r"\boxed{\sqrt{4}}", r"\boxed{5}"],
            [{"gold": "0.5"}, {"gold": "2"}, {"gold": "4"}],
        )
    assert result.rewards == [1.0, 1.0, 0.0]
