"""Splitting a batch between data-parallel ranks, and merging their metrics back (no Ray, no model)."""

from __future__ import annotations

import math

import pytest
import torch
from bounds import EPS32, within

from grpo_ray.records import Batch, Completion, Group
from learner.config import LearnerConfig
from learner.data_parallel import merge_metrics, split_batch
from learner.learner import batch_targets


def _batch(lengths: list[list[int]], rewards: list[list[float | None]]) -> Batch:
    groups = [
        Group(p, [1, 2, 3 + p], [Completion([7] * n, [-1.0] * n, "stop", "") for n in row], 0, 0)
        for p, row in enumerate(lengths)
    ]
    return Batch(groups, rewards, max_new_tokens=8)


BATCH = _batch(
    [[1, 5, 8], [2, 2, 7], [3, 6, 4], [8, 1, 1], [5, 5, 2]],
    [[0.0, 1.0, 0.5], [1.0, None, 0.0], [0.2, 0.2, 0.9], [1.0, 0.0, 0.0], [0.3, 0.1, 0.7]],
)


@pytest.mark.parametrize(("world_size", "micro"), [(2, 4), (3, 2), (4, 1), (20, 3)])
def test_shards_partition_the_batch_with_whole_batch_targets(world_size: int, micro: int) -> None:
    cfg = LearnerConfig(micro_batch_size=micro)
    shards = split_batch(BATCH, world_size, cfg)
    advantages_B, valid_B, normaliser = batch_targets(BATCH, cfg.loss)
    flat = [(g.prompt_index, id(c)) for g in BATCH.groups for c in g.completions]
    expected = {key: (float(a), bool(v)) for key, a, v in zip(flat, advantages_B, valid_B, strict=True)}

    seen = []
    for shard in shards:
        rows = [(g.prompt_index, id(c)) for g in shard.groups for c in g.completions]
        assert rows == sorted(rows, key=flat.index), "a shard keeps the batch's order"
        assert [expected[r] for r in rows] == list(zip(shard.advantages, shard.valid, strict=True))
        assert shard.normaliser == normaliser
        assert len(rows) <= shard.micro_batches * micro
        seen += rows
    assert sorted(seen, key=flat.index) == flat, "every sequence on exactly one rank"
    assert len({s.micro_batches for s in shards}) == 1, "every rank makes the same number of passes"
    sizes = [sum(len(g.completions) for g in s.groups) for s in shards]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.numeric
def test_shard_losses_sum_to_the_batch_loss() -> None:
    """The gradient-equivalence premise: each rank's loss over the global normaliser sums to the batch's."""
    from learner.config import LossConfig
    from learner.grpo import grpo_loss

    cfg = LearnerConfig()
    settings = LossConfig(clip_low=0.2, clip_high=0.28, beta=0.0, aggregation="token_mean", tis_cap=None)
    generator = torch.Generator().manual_seed(0)
    logprobs = {
        id(c): -torch.rand(len(c.token_ids), generator=generator) for g in BATCH.groups for c in g.completions
    }

    def loss(completions: list[Completion], advantages: list[float], valid: list[bool], norm: float) -> float:
        width = max(len(c.token_ids) for c in completions)
        logp = torch.zeros(len(completions), width)
        mask = torch.zeros(len(completions), width, dtype=torch.bool)
        for k, c in enumerate(completions):
            logp[k, : len(c.token_ids)] = logprobs[id(c)]
            mask[k, : len(c.token_ids)] = valid[k]
        value, _ = grpo_loss(logp, logp.detach() - 0.1, torch.tensor(advantages), mask, settings, norm)
        return float(value.double())

    advantages_B, valid_B, normaliser = batch_targets(BATCH, cfg.loss)
    whole = loss(
        [c for g in BATCH.groups for c in g.completions], advantages_B.tolist(), valid_B.tolist(), normaliser
    )
    parts = [
        loss([c for g in s.groups for c in g.completions], s.advantages, s.valid, s.normaliser)
        for s in split_batch(BATCH, 2, cfg)
    ]
    # Error model: the same per-token terms -A·ratio/N (ratio = e^0.1, unclipped) reduced in float32 over
    # the 60 tokens, whole or shard by shard: each within 60·EPS32/2 of exact relative to their absolute
    # sum S (Higham's γ_n), so the two within 60·EPS32·S.
    lengths_B = torch.tensor([len(c.token_ids) for g in BATCH.groups for c in g.completions])
    size = math.exp(0.1) * float((advantages_B.abs() * lengths_B * valid_B).sum()) / normaliser
    tol = int(lengths_B.sum()) * EPS32 * size
    assert whole != 0
    within("shard losses vs batch loss / error model", abs(sum(parts) - whole) / tol, 1.0)


@pytest.mark.numeric
def test_merged_metrics_read_like_one_learner() -> None:
    shards = split_batch(BATCH, 2, LearnerConfig())
    tokens = [sum(len(c.token_ids) for g in s.groups for c in g.completions) for s in shards]
    per_rank = [
        {
            "train/loss": 0.25 * (r + 1),
            "train/num_tokens": 10.0 + r,
            "train/clip_frac": 0.1 * r,
            "train/grad_norm": 3.0,
            "train/lr": 1e-3,
            "train/advantage_abs_mean": 99.0,
            "train/seconds": 1.0 + r,
            "sync/logprob_gap_mean": 0.1 * (r + 1),
            "sync/logprob_gap_max": 0.5 - r * 0.1,
        }
        for r in range(2)
    ]
    merged = merge_metrics(per_rank, shards)
    # Python float arithmetic on these exact inputs: a few roundings of 1.1e-16; approx's rel=1e-6 is ample
    assert merged["train/loss"] == pytest.approx(0.75)
    assert merged["train/num_tokens"] == 21.0
    assert merged["train/clip_frac"] == pytest.approx(0.1 * 11 / 21)
    assert merged["train/grad_norm"] == 3.0 and merged["train/lr"] == 1e-3
    assert merged["train/seconds"] == 2.0
    advantages_B, valid_B, _ = batch_targets(BATCH, LearnerConfig().loss)
    # the group's Python-float mean of the |A| against torch's float32 mean of the same 14 positive
    # values: within 14·EPS32/2 relative; we allow 14·EPS32
    expected_abs = float(advantages_B[valid_B].abs().mean())
    gap = abs(merged["train/advantage_abs_mean"] - expected_abs) / expected_abs
    within("merged mean|A| relative gap", gap, 14 * EPS32)
    expected_gap = (0.1 * tokens[0] + 0.2 * tokens[1]) / sum(tokens)
    assert merged["sync/logprob_gap_mean"] == pytest.approx(expected_gap)
    assert merged["sync/logprob_gap_max"] == 0.5
