"""Rewards: turn completions into per-sample floats, and never silently break training.

A reward function has the signature::

    fn(completions: list[str], rows: list[dict[str, Any]], **kwargs) -> list[float | None]

``completions`` is a batch of generated texts; ``rows[i]`` holds the dataset row fields of sample ``i``
and always includes ``gold``, the gold answer string extracted by the task loader; ``kwargs`` come from
the term's config. It returns one float (or int/bool) or None per completion. None, NaN, inf, a
non-number, raising, or running past ``rewards.timeout_s`` all mean "cannot score": that sample is
MASKED (never turned into 0) and counted. Full contract: :mod:`rewards.base`.

Configure terms with :class:`RewardsConfig` (built-ins: numeric_match, math_verify, format,
length_penalty, exact_match; or ``"package.module:function"``) and score with :class:`RewardScorer`,
which runs the functions in isolated, time-limited worker processes. Importing this package does not
import torch, sympy or any user module.
"""

from rewards.base import RewardConfigError, RewardError, RewardFailure
from rewards.config import RewardsConfig, RewardTerm
from rewards.scorer import RewardScorer, ScoreResult

__all__ = [
    "RewardConfigError",
    "RewardError",
    "RewardFailure",
    "RewardScorer",
    "RewardTerm",
    "RewardsConfig",
    "ScoreResult",
]
