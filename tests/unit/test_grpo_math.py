"""Unit tests for learner/grpo.py: hand-checkable values worked out in the comments."""

from __future__ import annotations

import math

import pytest
import torch
from bounds import EPS32, within

from learner.config import LossConfig
from learner.grpo import (
    combine_metrics,
    entropy_from_logits,
    group_advantages,
    grpo_loss,
    k3_kl,
    loss_normaliser,
    masked_mean,
    truncated_importance_weights,
)

NAN = float("nan")
LN2 = math.log(2.0)
# Counts over counts (clip and truncation fractions) are computed in float64: a handful of roundings of
# 1.1e-16 each; 1e-12 is far above that and far below the 1/n steps a miscount makes.
FRACTION_TOL = 1e-12

pytestmark = pytest.mark.numeric


def _t(x: object, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype)


def _settings(**kw: object) -> LossConfig:
    base: dict[str, object] = {
        "clip_low": 0.2,
        "clip_high": 0.28,
        "beta": 0.0,
        "aggregation": "token_mean",
        "tis_cap": None,
    }
    base.update(kw)
    return LossConfig(**base)  # type: ignore[arg-type]


def _hand_worked_tol(expected: torch.Tensor) -> torch.Tensor:
    """The error model of every hand-worked value here: float32 inputs through <= 4 elementwise ops
    (exp, log, sqrt, a division; each within 1 ulp, vectorised or not) on values no larger than
    max(1, |x|), plus 5e-7 where the expected value is written to 6 decimals:
    |err| <= 5e-7 + 4·EPS32·max(1, |x|), i.e. 9.8e-7 for |x| <= 1."""
    return 5e-7 + 4 * EPS32 * expected.double().abs().clamp(min=1.0)


def _assert_close(actual: torch.Tensor, expected: object) -> None:
    exp = torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.shape == exp.shape, (actual.shape, exp.shape)
    gap = (actual.detach().double() - exp.double()).abs()
    assert not gap.isnan().any(), (actual, exp)
    within("hand-worked tensor / error model", float((gap / _hand_worked_tol(exp)).max()), 1.0)


def _assert_near(actual: float, expected: float) -> None:
    tol = float(_hand_worked_tol(torch.tensor(expected)))
    within("hand-worked scalar / error model", abs(actual - expected) / tol, 1.0)


# --------------------------------------------------------------------------------------------------
# group_advantages
# --------------------------------------------------------------------------------------------------


def test_grpo_advantages_sample_std() -> None:
    rewards = _t([[1.0, 0.0, 0.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    valid = torch.ones(2, 4, dtype=torch.bool)
    adv = group_advantages(rewards, valid)
    # group [1,0,0,1]: mean 0.5, deviations +-0.5, sample var = 4*0.25/3 = 1/3, std = 0.577350
    #   -> A = +-0.5 / (0.577350 + 1e-6) = +-0.866024
    # group [1,2,3,4]: mean 2.5, deviations [-1.5,-0.5,0.5,1.5], sum sq = 5, sample var = 5/3,
    #   std = 1.290994 -> A = [-1.161894, -0.387298, 0.387298, 1.161894]
    _assert_close(
        adv,
        [
            [0.866024, -0.866024, -0.866024, 0.866024],
            [-1.161894, -0.387298, 0.387298, 1.161894],
        ],
    )
    assert adv.dtype == torch.float32


def test_dr_grpo_advantages_no_std_scaling() -> None:
    rewards = _t([[1.0, 0.0, 0.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    valid = torch.ones(2, 4, dtype=torch.bool)
    adv = group_advantages(rewards, valid, scale_by_std=False)
    # A = r - mean: group 1 mean 0.5 -> [0.5,-0.5,-0.5,0.5]; group 2 mean 2.5 -> [-1.5,-0.5,0.5,1.5]
    _assert_close(adv, [[0.5, -0.5, -0.5, 0.5], [-1.5, -0.5, 0.5, 1.5]])


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_zero_spread_group_is_exactly_zero(scale_by_std: bool) -> None:
    # 0.1 is not representable: (0.1+0.1+0.1)/3 - 0.1 may be a few ulps, which divided by (0 + 1e-6)
    # would be ~1e-3 without the exact max == min check. Must be exactly 0 in both modes.
    rewards = _t([[0.1, 0.1, 0.1], [0.7, 0.7, 0.7], [1.0, 0.0, 1.0]])
    valid = torch.ones(3, 3, dtype=torch.bool)
    adv = group_advantages(rewards, valid, scale_by_std=scale_by_std)
    assert torch.equal(adv[:2], torch.zeros(2, 3))
    assert (adv[2] != 0).all()  # the non-degenerate group is untouched
    # float64: (0.1 + 0.1 + 0.1) / 3 = 0.10000000000000002 != 0.1, so r - mean = -1.4e-17 and
    # (r - mean) / (0 + 1e-6) = -1.4e-11 unless zero spread is detected exactly
    rewards64 = _t([[0.1, 0.1, 0.1], [0.7, 0.7, 0.7], [1.0, 0.0, 1.0]], torch.float64)
    adv64 = group_advantages(rewards64, valid, scale_by_std=scale_by_std)
    assert adv64.dtype == torch.float64
    assert torch.equal(adv64[:2], torch.zeros(2, 3, dtype=torch.float64))


def test_masked_nan_members_excluded_and_zero() -> None:
    rewards = _t([[1.0, NAN, 0.0, 1.0], [1.0, 100.0, 0.0, 1.0]])
    valid = _t([[True, False, True, True], [True, False, True, True]], torch.bool)
    adv = group_advantages(rewards, valid)
    # valid rewards [1,0,1] in both rows (the 100 is masked, so it must NOT enter the stats):
    #   mean 2/3, deviations [1/3, -2/3, 1/3], sum sq = 6/9, sample var = (6/9)/2 = 1/3, std 0.577350
    #   -> A = [0.333333/0.577351, 0, -0.666667/0.577351, 0.333333/0.577351] = [0.577349, 0, -1.154699, 0.577349]
    expected = [0.577349, 0.0, -1.154699, 0.577349]
    _assert_close(adv, [expected, expected])
    assert torch.isfinite(adv).all()
    assert adv[0, 1].item() == 0.0 and adv[1, 1].item() == 0.0

    dr = group_advantages(rewards, valid, scale_by_std=False)
    # Dr. GRPO: r - 2/3 -> [1/3, 0, -2/3, 1/3]
    _assert_close(dr, [[1 / 3, 0.0, -2 / 3, 1 / 3]] * 2)
    assert torch.isfinite(dr).all()


def test_nan_flagged_valid_is_treated_as_invalid() -> None:
    rewards = _t([[1.0, NAN, 0.0, 1.0]])
    valid = torch.ones(1, 4, dtype=torch.bool)  # caller forgot to mask the NaN
    adv = group_advantages(rewards, valid)
    _assert_close(adv, [[0.577349, 0.0, -1.154699, 0.577349]])


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_groups_with_fewer_than_two_valid_members_are_zero(scale_by_std: bool) -> None:
    rewards = _t([[5.0, NAN, NAN, NAN], [NAN, NAN, NAN, NAN], [3.0, -1.0, 7.0, 2.0]])
    valid = _t([[True, False, False, False], [False] * 4, [False, True, False, False]], torch.bool)
    adv = group_advantages(rewards, valid, scale_by_std=scale_by_std)
    # row 0: one valid member; row 1: none; row 2: one valid member -> all exactly 0, no NaN
    assert torch.equal(adv, torch.zeros(3, 4))


def test_advantages_accept_float_valid_and_int_rewards() -> None:
    adv = group_advantages(torch.tensor([[1, 0]]), torch.tensor([[1.0, 1.0]]), scale_by_std=False)
    # int rewards -> float32 output; mean 0.5 -> [0.5, -0.5]
    assert adv.dtype == torch.float32
    _assert_close(adv, [[0.5, -0.5]])


def test_advantages_shape_errors() -> None:
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(2, 4), torch.ones(2, 3, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------
# k3 KL
# --------------------------------------------------------------------------------------------------


def test_k3_known_values() -> None:
    logp = torch.log(_t([[0.5, 0.25, 0.3]]))
    ref = torch.log(_t([[0.25, 0.5, 0.3]]))
    # d = ref - logp: [ln 0.5, ln 2, 0]
    #   [0]: exp(-ln2) + ln2 - 1 = 0.5 + 0.693147 - 1 = 0.193147
    #   [1]: exp(ln2)  - ln2 - 1 = 2 - 0.693147 - 1   = 0.306853
    #   [2]: 1 - 0 - 1 = 0
    _assert_close(k3_kl(logp, ref), [[0.5 + LN2 - 1.0, 2.0 - LN2 - 1.0, 0.0]])


def test_k3_non_negative_and_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(64, 32, generator=g) * 3).requires_grad_(True)
    ref = torch.randn(64, 32, generator=g) * 3
    kl = k3_kl(logp, ref)
    assert (kl >= 0).all()
    kl.sum().backward()
    # d/dlogp [exp(ref - logp) - (ref - logp) - 1] = 1 - exp(ref - logp)
    assert logp.grad is not None
    e = torch.exp(ref - logp.detach())
    # autograd's 1 - (expm1(d) + 1) against 1 - exp(d): expm1, exp and the two additions each round
    # once (<= 1 ulp), relative to max(1, e^d): |err| <= 4·EPS32·(1 + e^d)
    gap = (logp.grad.double() - (1.0 - e).double()).abs()
    within("k3 gradient / error model", float((gap / (4 * EPS32 * (1 + e.double()))).max()), 1.0)


# --------------------------------------------------------------------------------------------------
# truncated importance sampling
# --------------------------------------------------------------------------------------------------


def test_tis_weights_truncate_and_stats() -> None:
    sampler = torch.zeros(1, 5)
    learner = torch.log(_t([[0.5, 1.0, 1.5, 4.0, 100.0]])).requires_grad_(True)
    mask = _t([[1, 1, 1, 1, 0]])  # the 100x token is padding and must not count
    w, stats = truncated_importance_weights(learner, sampler, mask, cap=2.0)
    # raw rho over masked-in tokens = [0.5, 1, 1.5, 4] -> w = min(rho, 2) = [0.5, 1, 1.5, 2], pad -> 0
    _assert_close(w, [[0.5, 1.0, 1.5, 2.0, 0.0]])
    assert not w.requires_grad
    # stats on RAW rho: mean (0.5+1+1.5+4)/4 = 1.75, min 0.5, max 4, truncated 1 of 4 = 0.25
    _assert_near(stats["ratio_mean"], 1.75)
    _assert_near(stats["ratio_min"], 0.5)
    _assert_near(stats["ratio_max"], 4.0)
    assert stats["trunc_frac"] == pytest.approx(0.25, abs=FRACTION_TOL)
    assert stats["num_tokens"] == 4.0
    # truncation is strict (rho > cap): rho = exp(0) = 1 exactly at cap 1 is not counted as truncated
    w1, stats1 = truncated_importance_weights(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), cap=1.0)
    _assert_close(w1, [[1.0, 1.0]])
    assert stats1["trunc_frac"] == 0.0


def test_tis_nan_padding_and_empty_mask() -> None:
    learner = _t([[NAN, 0.0]])
    sampler = _t([[0.0, NAN]])
    w, stats = truncated_importance_weights(learner, sampler, torch.zeros(1, 2, dtype=torch.bool), cap=2.0)
    assert torch.equal(w, torch.zeros(1, 2))
    assert stats == {
        "ratio_mean": 0.0,
        "ratio_min": 0.0,
        "ratio_max": 0.0,
        "trunc_frac": 0.0,
        "num_tokens": 0.0,
        "nonfinite_sampler": 0.0,  # NaN only at padding: not counted
    }


# --------------------------------------------------------------------------------------------------
# grpo_loss: clipping
# --------------------------------------------------------------------------------------------------


def test_clipping_branches_and_clip_fraction() -> None:
    # 5 one-token sequences, clip_low 0.2 -> [0.8, 1.28] with clip_high 0.28
    ratios = [1.5, 0.5, 0.5, 1.5, 1.0]
    adv = _t([2.0, 1.0, -1.0, -1.0, 1.0])
    old = torch.zeros(5, 1)
    logp = torch.log(_t(ratios)).reshape(5, 1).requires_grad_(True)
    mask = torch.ones(5, 1)
    settings = _settings()
    n = loss_normaliser(mask, "token_mean", 1)
    assert n == 5.0
    loss, metrics = grpo_loss(logp, old, adv, mask, settings, n)
    # surrogate = min(ratio*A, clip(ratio)*A):
    #   A=+2, r=1.5: min(3.0, 2*1.28) = 2.56  clipped (high)
    #   A=+1, r=0.5: min(0.5, 0.8)    = 0.5   unclipped (no lower clip for A>0)
    #   A=-1, r=0.5: min(-0.5, -0.8)  = -0.8  clipped (low)
    #   A=-1, r=1.5: min(-1.5, -1.28) = -1.5  unclipped (no upper clip for A<0)
    #   A=+1, r=1.0: 1.0
    # loss = -(2.56 + 0.5 - 0.8 - 1.5 + 1.0) / 5 = -1.76 / 5 = -0.352
    # (swapping clip_low/clip_high would give 2.4 and -0.72 -> -1.68 / 5 = -0.336)
    _assert_near(loss.item(), -0.352)
    loss.backward()
    # d loss / d logp = -ratio*A/5 on unclipped tokens, 0 on clipped ones:
    #   [0, -0.5/5, 0, +1.5/5, -1/5] = [0, -0.1, 0, 0.3, -0.2]
    assert logp.grad is not None
    _assert_close(logp.grad, [[0.0], [-0.1], [0.0], [0.3], [-0.2]])
    assert metrics["clip_frac_high"] == pytest.approx(0.2, abs=FRACTION_TOL)
    assert metrics["clip_frac_low"] == pytest.approx(0.2, abs=FRACTION_TOL)
    assert metrics["clip_frac"] == pytest.approx(0.4, abs=FRACTION_TOL)
    # ratio mean = (1.5 + 0.5 + 0.5 + 1.5 + 1) / 5 = 1.0
    _assert_near(metrics["ratio_mean"], 1.0)
    _assert_near(metrics["loss"], -0.352)
    assert metrics["num_tokens"] == 5.0 and metrics["num_seqs"] == 5.0
    assert "kl_mean" not in metrics and not any(k.startswith("tis/") for k in metrics)


# --------------------------------------------------------------------------------------------------
# grpo_loss: aggregations on a 2x3 example
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("aggregation", "expected_normaliser", "expected_loss"),
    [
        # per-token loss = -A (ratio 1): seq0 three tokens of -1 (sum -3), seq1 one token of +2 (sum +2)
        # token_mean: N = 4 tokens       -> (-3 + 2) / 4 = -0.25
        ("token_mean", 4.0, -0.25),
        # seq_mean: per-seq means -1, +2; N = 2 seqs -> (-1 + 2) / 2 = 0.5
        ("seq_mean", 2.0, 0.5),
        # constant: N = 2 seqs * max_new_tokens 3 = 6 -> (-3 + 2) / 6 = -1/6
        ("constant", 6.0, -1.0 / 6.0),
    ],
)
def test_aggregations_2x3(aggregation: str, expected_normaliser: float, expected_loss: float) -> None:
    old = torch.log(_t([[0.5, 0.4, 0.3], [0.2, 0.1, 0.9]]))
    logp = old.clone().requires_grad_(True)
    adv = _t([1.0, -2.0])
    mask = _t([[1, 1, 1], [1, 0, 0]])
    n = loss_normaliser(mask, aggregation, max_new_tokens=3)
    assert n == expected_normaliser
    loss, metrics = grpo_loss(logp, old, adv, mask, _settings(aggregation=aggregation), n)
    _assert_near(loss.item(), expected_loss)
    _assert_near(metrics["loss"], expected_loss)
    assert metrics["num_tokens"] == 4.0 and metrics["num_seqs"] == 2.0
    loss.backward()
    # at ratio 1 d/dlogp of -ratio*A is -A; scaled by 1/N (token_mean, constant) or 1/(N*len_b) (seq_mean)
    assert logp.grad is not None
    if aggregation == "seq_mean":
        expected_grad = [[-1 / 6, -1 / 6, -1 / 6], [1.0, 0.0, 0.0]]  # -1/(2*3), +2/(2*1)
    else:
        expected_grad = [[-1 / n] * 3, [2 / n, 0.0, 0.0]]
    _assert_close(logp.grad, expected_grad)


def test_loss_normaliser_cases() -> None:
    mask = _t([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert loss_normaliser(mask, "token_mean", 4) == 4.0  # 3 + 1 + 0 tokens
    assert loss_normaliser(mask, "seq_mean", 4) == 2.0  # row 2 is empty
    assert loss_normaliser(mask, "constant", 4) == 12.0  # all 3 rows * 4
    empty = torch.zeros(2, 3, dtype=torch.bool)
    assert loss_normaliser(empty, "token_mean", 4) == 1.0  # clamped, never 0
    assert loss_normaliser(empty, "seq_mean", 4) == 1.0
    assert loss_normaliser(empty, "constant", 4) == 8.0
    with pytest.raises(ValueError):
        loss_normaliser(mask, "sum", 4)


# --------------------------------------------------------------------------------------------------
# grpo_loss: KL, TIS, masking, errors
# --------------------------------------------------------------------------------------------------


def test_kl_term_and_metric() -> None:
    old = torch.log(torch.full((1, 2), 0.5))
    logp = old.clone().requires_grad_(True)
    ref = torch.log(torch.full((1, 2), 0.25))
    mask = torch.ones(1, 2)
    # A = 0 so the surrogate is 0; k3 per token = 0.5 + ln2 - 1 = 0.193147
    # token_mean: loss = beta * (2 * 0.193147) / 2 = 0.1 * 0.193147 = 0.0193147
    loss, metrics = grpo_loss(logp, old, _t([0.0]), mask, _settings(beta=0.1), 2.0, ref_logprobs_B_T=ref)
    _assert_near(loss.item(), 0.1 * (0.5 + LN2 - 1.0))
    _assert_near(metrics["kl_mean"], 0.5 + LN2 - 1.0)
    loss.backward()
    # d/dlogp beta*k3/2 = beta*(1 - exp(ref - logp))/2 = 0.1*(1 - 0.5)/2 = 0.025
    assert logp.grad is not None
    _assert_close(logp.grad, [[0.025, 0.025]])


def test_tis_applied_in_loss() -> None:
    old = torch.zeros(1, 2)
    logp = old.clone().requires_grad_(True)
    sampler = torch.log(_t([[1 / 3, 2.0]]))  # rho = exp(old - sampler) = [3, 0.5]
    mask = torch.ones(1, 2)
    settings = _settings(tis_cap=2.0)
    loss, metrics = grpo_loss(logp, old, _t([1.0]), mask, settings, 2.0, sampler_logprobs_B_T=sampler)
    # w = min(rho, 2) = [2, 0.5]; surrogate = ratio*A = 1 per token -> loss = -(2 + 0.5)/2 = -1.25
    _assert_near(loss.item(), -1.25)
    loss.backward()
    # d/dlogp (-w*ratio*A/2) = -w/2 = [-1, -0.25]
    assert logp.grad is not None
    _assert_close(logp.grad, [[-1.0, -0.25]])
    # raw rho stats: mean 1.75, min 0.5, max 3, trunc 1/2; weight mean (2 + 0.5)/2 = 1.25
    _assert_near(metrics["tis/ratio_mean"], 1.75)
    _assert_near(metrics["tis/ratio_min"], 0.5)
    _assert_near(metrics["tis/ratio_max"], 3.0)
    assert metrics["tis/trunc_frac"] == pytest.approx(0.5, abs=FRACTION_TOL)
    _assert_near(metrics["tis/weight_mean"], 1.25)

    # sampler given but TIS disabled: stats are reported, no weights applied -> loss = -(1 + 1)/2 = -1
    loss2, metrics2 = grpo_loss(logp, old, _t([1.0]), mask, _settings(), 2.0, sampler_logprobs_B_T=sampler)
    _assert_near(loss2.item(), -1.0)
    assert metrics2["tis/trunc_frac"] == 0.0
    _assert_near(metrics2["tis/weight_mean"], 1.0)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "constant"])
def test_all_masked_sequence_and_batch_give_zero_and_finite_grads(aggregation: str) -> None:
    # row 1 is fully masked and full of garbage (NaN / -inf) at every position, in every input
    logp_data = _t([[-1.0, -2.0], [NAN, -math.inf]])
    old = _t([[-1.2, -1.5], [-math.inf, NAN]])
    ref = _t([[-1.1, -2.5], [NAN, NAN]])
    sampler = _t([[-1.0, -1.4], [math.inf, NAN]])
    adv = _t([0.5, NAN])
    mask = _t([[True, True], [False, False]], torch.bool)
    settings = _settings(aggregation=aggregation, beta=0.05, tis_cap=2.0)
    logp = logp_data.clone().requires_grad_(True)
    n = loss_normaliser(mask, aggregation, 2)
    loss, metrics = grpo_loss(
        logp, old, adv, mask, settings, n, ref_logprobs_B_T=ref, sampler_logprobs_B_T=sampler
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert logp.grad is not None and torch.isfinite(logp.grad).all()
    assert torch.equal(logp.grad[1], torch.zeros(2))
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["num_seqs"] == 1.0 and metrics["num_tokens"] == 2.0

    # the same rows with row 1 dropped give the same loss (row 1 contributes exactly 0)
    loss_row0, _ = grpo_loss(
        logp_data[:1],
        old[:1],
        adv[:1],
        mask[:1],
        settings,
        n,
        ref_logprobs_B_T=ref[:1],
        sampler_logprobs_B_T=sampler[:1],
    )
    assert loss.item() == loss_row0.item()

    # whole batch masked: loss exactly 0, grads exactly 0, normaliser clamped to >= 1
    none = torch.zeros(2, 2, dtype=torch.bool)
    logp2 = logp_data.clone().requires_grad_(True)
    n2 = loss_normaliser(none, aggregation, 2)
    assert n2 >= 1.0
    loss2, metrics2 = grpo_loss(
        logp2, old, adv, none, settings, n2, ref_logprobs_B_T=ref, sampler_logprobs_B_T=sampler
    )
    loss2.backward()
    assert loss2.item() == 0.0
    assert logp2.grad is not None and torch.equal(logp2.grad, torch.zeros(2, 2))
    assert metrics2["loss"] == 0.0 and metrics2["num_tokens"] == 0.0 and metrics2["clip_frac"] == 0.0
    assert all(math.isfinite(v) for v in metrics2.values())


def test_beta_zero_works_without_ref() -> None:
    logp = torch.log(_t([[0.5, 0.5]])).requires_grad_(True)
    loss, metrics = grpo_loss(logp, logp.detach(), _t([1.0]), torch.ones(1, 2), _settings(beta=0.0), 2.0)
    # ratio 1, A = 1 -> loss = -(1 + 1)/2 = -1
    _assert_near(loss.item(), -1.0)
    assert "kl_mean" not in metrics
    # ref given with beta = 0: KL is reported but does not enter the loss
    ref = torch.log(_t([[0.25, 0.25]]))
    loss_r, metrics_r = grpo_loss(logp, logp.detach(), _t([1.0]), torch.ones(1, 2), _settings(), 2.0, ref)
    _assert_near(loss_r.item(), -1.0)
    _assert_near(metrics_r["kl_mean"], 0.5 + LN2 - 1.0)


def test_loss_argument_errors() -> None:
    logp = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    adv = _t([1.0])
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(logp, logp, adv, mask, _settings(beta=0.1), 2.0)
    with pytest.raises(ValueError, match="sampler_logprobs"):
        grpo_loss(logp, logp, adv, mask, _settings(tis_cap=2.0), 2.0)
    with pytest.raises(ValueError):
        grpo_loss(logp, logp, _t([1.0, 2.0]), mask, _settings(), 2.0)
    with pytest.raises(ValueError):
        grpo_loss(logp, torch.zeros(1, 3), adv, mask, _settings(), 2.0)
    with pytest.raises(ValueError):
        grpo_loss(logp, logp, adv, mask, _settings(), 0.0)
    with pytest.raises(ValueError):
        _settings(aggregation="sum")
    with pytest.raises(ValueError):
        _settings(clip_low=1.0)
    with pytest.raises(ValueError):
        _settings(tis_cap=0.0)
    with pytest.raises(ValueError):
        _settings(beta=-0.1)


# --------------------------------------------------------------------------------------------------
# micro-batching equivalence
# --------------------------------------------------------------------------------------------------


def _policy_logprobs(
    weight: torch.Tensor, feats_B_T_D: torch.Tensor, tokens_B_T: torch.Tensor
) -> torch.Tensor:
    """A tiny linear "policy": logits = feats @ W, logprob of the sampled token."""
    logp_B_T_V = torch.log_softmax(feats_B_T_D @ weight, dim=-1)
    return logp_B_T_V.gather(-1, tokens_B_T.unsqueeze(-1)).squeeze(-1)


def _abs_gradient_terms(
    weight0: torch.Tensor, feats: torch.Tensor, tokens: torch.Tensor, *loss_args: object
) -> torch.Tensor:
    """Σ_bt |feats_bt| ⊗ |dloss/dlogits_bt|: the size of W.grad's per-token terms, element by element."""
    logits = (feats @ weight0).requires_grad_(True)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    old, adv, mask, settings, n, ref, sampler = loss_args
    loss, _ = grpo_loss(logp, old, adv, mask, settings, n, ref, sampler)  # type: ignore[arg-type]
    loss.backward()
    assert logits.grad is not None
    return torch.einsum("btd,btv->dv", feats.abs().double(), logits.grad.abs().double())


def _per_token_scale(
    logp: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    settings: LossConfig,
    ref: torch.Tensor,
    sampler: torch.Tensor,
) -> float:
    """An upper bound on every per-token value the loss and its metrics reduce: ratio and IS weight,
    |surrogate| <= |A|·max(ratio, 1 + clip_high)·cap, and beta·k3."""
    ratio = torch.exp(logp - old)[mask]
    assert settings.tis_cap is not None
    weight = torch.exp(old - sampler)[mask]
    surrogate = (
        adv.abs()[:, None].expand_as(mask)[mask] * ratio.clamp(min=1 + settings.clip_high) * settings.tis_cap
    )
    kl = k3_kl(logp, ref)[mask]
    return float(max(1.0, ratio.max(), weight.max(), surrogate.max() + settings.beta * kl.max(), kl.max()))


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "constant"])
def test_micro_batch_gradients_match_full_batch(aggregation: str) -> None:
    g = torch.Generator().manual_seed(1234)
    B, T, D, V = 5, 6, 4, 7
    feats = torch.randn(B, T, D, generator=g)
    tokens = torch.randint(0, V, (B, T), generator=g)
    weight0 = torch.randn(D, V, generator=g)
    lengths = torch.tensor([6, 3, 0, 1, 5])  # includes an all-masked row
    mask = torch.arange(T)[None, :] < lengths[:, None]
    with torch.no_grad():
        base = _policy_logprobs(weight0, feats, tokens)
        old = base + 0.3 * torch.randn(B, T, generator=g)  # ratios spread around 1 -> some clipping
        ref = base + 0.2 * torch.randn(B, T, generator=g)
        sampler = old + 0.5 * torch.randn(B, T, generator=g)  # some TIS truncation at cap 1.5
    adv = torch.randn(B, generator=g)
    settings = _settings(aggregation=aggregation, beta=0.05, tis_cap=1.5)
    n = loss_normaliser(mask, aggregation, max_new_tokens=T)

    w_full = weight0.clone().requires_grad_(True)
    loss_full, metrics_full = grpo_loss(
        _policy_logprobs(w_full, feats, tokens), old, adv, mask, settings, n, ref, sampler
    )
    loss_full.backward()
    assert w_full.grad is not None and w_full.grad.abs().sum() > 0
    assert 0.0 < metrics_full["clip_frac"] < 1.0  # the example really exercises clipping
    assert 0.0 < metrics_full["tis/trunc_frac"] < 1.0  # ... and truncation

    w_micro = weight0.clone().requires_grad_(True)
    parts = []
    total = 0.0
    for sl in (slice(0, 2), slice(2, 5)):  # uneven split: 2 + 3 rows
        loss_mb, metrics_mb = grpo_loss(
            _policy_logprobs(w_micro, feats[sl], tokens[sl]),
            old[sl],
            adv[sl],
            mask[sl],
            settings,
            n,
            ref[sl],
            sampler[sl],
        )
        loss_mb.backward()  # gradients accumulate in w_micro.grad
        parts.append(metrics_mb)
        total += loss_mb.item()

    # Error model: W.grad = Σ_bt feats_bt ⊗ dlogits_bt, the same B·T per-token terms (grpo_loss is
    # per token, and both runs share the normaliser) summed in another grouping (2 + 3 rows): each sum
    # is within B·T·EPS32/2 of exact relative to Σ|terms| (Higham's γ_n), so the two within B·T·EPS32.
    grad_tol = (
        B * T * EPS32 * _abs_gradient_terms(weight0, feats, tokens, old, adv, mask, settings, n, ref, sampler)
    )
    assert w_micro.grad is not None
    within(
        "micro-batch vs full gradient / error model",
        float((w_full.grad - w_micro.grad).abs().div(grad_tol).max()),
        1.0,
    )
    # The metrics are means of the same <= B·T per-token values, each no larger than `scale`, and the
    # loss their sum over n: the same γ_n model with Σ|terms| <= B·T·scale (over n for the loss).
    scale = _per_token_scale(_policy_logprobs(weight0, feats, tokens), old, adv, mask, settings, ref, sampler)
    metric_tol = B * T * EPS32 * scale
    loss_tol = metric_tol * B * T / n
    within("micro-batch vs full loss / error model", abs(total - loss_full.item()) / loss_tol, 1.0)

    combined = combine_metrics(parts)
    assert set(combined) == set(metrics_full)
    for key, value in metrics_full.items():
        tol = loss_tol if key == "loss" else metric_tol
        within(f"micro-batch vs full {key} / error model", abs(combined[key] - value) / tol, 1.0)

    # using a per-micro-batch normaliser instead would NOT match (guards the test's sensitivity)
    w_bad = weight0.clone().requires_grad_(True)
    for sl in (slice(0, 2), slice(2, 5)):
        n_mb = loss_normaliser(mask[sl], aggregation, max_new_tokens=T)
        loss_mb, _ = grpo_loss(
            _policy_logprobs(w_bad, feats[sl], tokens[sl]),
            old[sl],
            adv[sl],
            mask[sl],
            settings,
            n_mb,
            ref[sl],
            sampler[sl],
        )
        loss_mb.backward()
    assert w_bad.grad is not None
    assert ((w_full.grad - w_bad.grad).abs() > grad_tol).any()


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def test_masked_mean() -> None:
    x = _t([[1.0, 2.0, NAN], [4.0, math.inf, 6.0]])
    mask = _t([[1, 1, 0], [1, 0, 1]])
    # (1 + 2 + 4 + 6) / 4 = 3.25; NaN/inf at masked positions ignored
    _assert_near(masked_mean(x, mask).item(), 3.25)
    assert masked_mean(x, torch.zeros(2, 3)).item() == 0.0


def test_entropy_from_logits() -> None:
    logits = torch.tensor(
        [[[0.0, 0.0, 0.0, 0.0], [1e4, 1e4, -math.inf, -math.inf], [5.0, -math.inf, -math.inf, -math.inf]]],
        requires_grad=True,
    )
    h = entropy_from_logits(logits)
    # uniform over 4 -> ln 4 = 1.386294; uniform over 2 (huge logits, two -inf) -> ln 2; one-hot -> 0
    _assert_close(h, [[math.log(4.0), LN2, 0.0]])
    h.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    # bf16 logits are upcast: result is float32 and exact for the uniform case
    h16 = entropy_from_logits(torch.zeros(2, 3, 8, dtype=torch.bfloat16))
    assert h16.dtype == torch.float32
    _assert_close(h16, torch.full((2, 3), math.log(8.0)))


def test_combine_metrics_rules() -> None:
    a = {
        "loss": -0.5,
        "num_tokens": 3.0,
        "num_seqs": 1.0,
        "ratio_mean": 1.0,
        "tis/ratio_min": 0.9,
        "tis/ratio_max": 1.2,
    }
    b = {
        "loss": 0.25,
        "num_tokens": 1.0,
        "num_seqs": 1.0,
        "ratio_mean": 2.0,
        "tis/ratio_min": 0.5,
        "tis/ratio_max": 3.0,
    }
    empty = {
        "loss": 0.0,
        "num_tokens": 0.0,
        "num_seqs": 0.0,
        "ratio_mean": 0.0,
        "tis/ratio_min": 0.0,
        "tis/ratio_max": 0.0,
    }
    c = combine_metrics([a, b, empty])
    # sums: loss -0.25, tokens 4, seqs 2; weighted mean ratio (3*1 + 1*2)/4 = 1.25; min/max skip the empty part
    assert c == {
        "loss": -0.25,
        "num_tokens": 4.0,
        "num_seqs": 2.0,
        "ratio_mean": 1.25,
        "tis/ratio_min": 0.5,
        "tis/ratio_max": 3.0,
    }
    assert combine_metrics([]) == {}
