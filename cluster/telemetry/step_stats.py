"""Rollout-side statistics of one step, from the groups and their rewards. Pure Python."""

from __future__ import annotations

import statistics

from grpo_ray.records import Group


def rollout_stats(
    groups: list[Group], rewards_P_G: list[list[float | None]], correct_P_G: list[list[bool]]
) -> dict[str, float]:
    """The step's rollout metrics from P groups of G completions, their rewards and verdicts.

    `rewards_P_G[p][g]` is the combined reward (None: masked), `correct_P_G[p][g]` the correctness
    verdict. Returns `reward/mean` and `reward/std` (population std) over unmasked rewards (NaN / 0
    with none), `rollout/accuracy` (fraction correct), `rollout/zero_spread_groups` (fraction of
    groups whose unmasked rewards are all equal: no learning signal), completion length mean and max
    (tokens), `rollout/truncated_fraction` (hit max_new_tokens), and the oldest policy version sampled.
    """
    valid = [r for group in rewards_P_G for r in group if r is not None]
    lengths = [len(c.token_ids) for g in groups for c in g.completions]
    truncated = [c.truncated for g in groups for c in g.completions]
    zero_spread = [len({r for r in group if r is not None}) <= 1 for group in rewards_P_G]
    correct = [ok for group in correct_P_G for ok in group]
    versions = [g.policy_version for g in groups]
    return {
        "reward/mean": statistics.fmean(valid) if valid else float("nan"),
        "reward/std": statistics.pstdev(valid) if len(valid) > 1 else 0.0,
        "rollout/accuracy": sum(correct) / max(1, len(correct)),
        "rollout/zero_spread_groups": sum(zero_spread) / max(1, len(zero_spread)),
        "rollout/completion_len_mean": statistics.fmean(lengths) if lengths else 0.0,
        "rollout/completion_len_max": float(max(lengths, default=0)),
        "rollout/truncated_fraction": sum(truncated) / max(1, len(truncated)),
        "rollout/policy_version_min": float(min(versions, default=-1)),
    }
