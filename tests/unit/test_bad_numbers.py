"""Numbers from the engine and the metrics (issue 16): a NaN sampler logprob on a real token with TIS on
keeps the loss finite (ratio 1, counted); train/lr is the rate the step used, not the next one."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from grpo_ray.records import Batch, Completion, Group
from learner.config import LearnerConfig, LossConfig
from learner.grpo import grpo_loss, truncated_importance_weights
from learner.learner import Learner


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_sampler_logprob_gets_ratio_one(bad: float) -> None:
    learner = torch.tensor([[-1.0, -2.0, -3.0]])
    sampler = torch.tensor([[-1.5, bad, -3.0]])
    w, stats = truncated_importance_weights(learner, sampler, torch.ones(1, 3, dtype=torch.bool), cap=2.0)
    # exp(-1 - -1.5) = exp(0.5) = 1.6487..; the bad token: ratio 1; the last: exp(0) = 1
    torch.testing.assert_close(w, torch.tensor([[math.exp(0.5), 1.0, 1.0]]))  # float32: one rounding each
    assert stats["nonfinite_sampler"] == 1.0 and math.isfinite(stats["ratio_max"])


def test_nan_sampler_logprob_keeps_the_loss_and_gradient_finite() -> None:
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    sampler = torch.tensor([[-1.0, math.nan, -0.5]])
    settings = LossConfig(clip_low=0.2, clip_high=0.28, beta=0.0, aggregation="token_mean", tis_cap=2.0)
    loss, metrics = grpo_loss(
        logp,
        logp.detach(),
        torch.tensor([1.0]),
        torch.ones(1, 3, dtype=torch.bool),
        settings,
        normaliser=3.0,
        sampler_logprobs_B_T=sampler,
    )
    loss.backward()
    assert logp.grad is not None
    assert math.isfinite(loss.item()) and bool(torch.isfinite(logp.grad).all())
    # ratio 1 everywhere and weight 1: loss = -(1 * A) averaged over 3 tokens = -1 (exact in float32)
    assert loss.item() == -1.0
    assert metrics["tis/nonfinite_sampler"] == 1.0


def _batch(bad_logprob: float = -1.0) -> Batch:
    completions = [Completion([11, 12, 13], [-1.0, bad_logprob, -1.0], "stop", "")] + [
        Completion([11, 14], [-1.0, -1.0], "stop", "") for _ in range(2)
    ]
    return Batch([Group(0, [5, 17, 9], completions, 0, 0)], [[0.0, 1.0, 0.5]], max_new_tokens=4)


def test_learner_step_with_a_nan_sampler_logprob(tiny_model: Path) -> None:
    cfg = LearnerConfig(quantization="none", compute_dtype="float32", micro_batch_size=3)
    learner = Learner(str(tiny_model), cfg, seed=0, temperature=1.0, rollout_dtype="float32", pad_id=0)
    metrics = learner.train_step(_batch(math.nan))
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["train/grad_norm"])
    assert metrics["train/tis/nonfinite_sampler"] == 1.0
    assert math.isfinite(metrics["sync/logprob_gap_max"])


def test_logged_lr_is_the_rate_the_step_used(tiny_model: Path) -> None:
    # warm-up 4, lr 2e-3: LambdaLR scales by (s + 1) / 4 at scheduler step s, so optimiser step 1
    # applies 5e-4 and step 2 applies 1e-3 (it used to log 1e-3 for step 1).
    cfg = LearnerConfig(
        quantization="none", compute_dtype="float32", micro_batch_size=3, learning_rate=2e-3, warmup_steps=4
    )
    learner = Learner(str(tiny_model), cfg, seed=0, temperature=1.0, rollout_dtype="float32", pad_id=0)
    used = []
    for _ in range(2):
        used.append(learner.updater.optimizer.param_groups[0]["lr"])  # type: ignore[attr-defined]
        logged = learner.train_step(_batch())["train/lr"]
        assert logged == used[-1]
    assert used == pytest.approx([5e-4, 1e-3], rel=1e-12)  # 2e-3 * 1/4 and * 2/4: one float product each
