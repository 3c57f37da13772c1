"""Data-parallel learner: two DeepSpeed ranks (CPU, gloo) train like one Learner on the whole batch.

Every step the two-rank group takes is replayed by a one-rank Learner (the plain actor, no DeepSpeed)
from the group's own state before the step: its checkpoint (adapter, AdamW moments, step count), in
the one-rank format. Both then take the step from the same bits and differ only in float32 summation
order: other micro-batch compositions (each rank sorts its own rows into micro-batches of 4), the
ranks' gradient all-reduce. Compared after each step:

* the gradient that reached AdamW, read back from its first moment (m = b1·m_prev + (1 - b1)·g, with
  m_prev the same on both sides), as a relative L2 gap; the second moment likewise; the loss and the
  gradient norm. A wrong shard, advantage, normaliser or gradient scale is off by O(1) in these.
* the group's weights against AdamW's update from the group's own moments, recomputed in float64.
  The two runs' weights are NOT compared with each other: AdamW divides each gradient element by
  sqrt(v) + 1e-8, so where a gradient element nearly cancels (~1e-8) a last-bit difference in it
  becomes a weight difference of up to ~lr, and which elements do that depends on the CPU's kernels
  (0.2% of them by > 0.01 lr after three steps under MKL_CBWR=COMPATIBLE on this project's machine).
* the two ranks' adapters, bit for bit: one all-reduced gradient through the same code on one machine.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from bounds import EPS32, within

from cluster.config import RunConfig, load_config
from grpo_ray.records import Batch, Completion, Group

pytestmark = [pytest.mark.integration, pytest.mark.numeric]

ROOT = Path(__file__).resolve().parents[2]
# 16, 15 and 9 sequences at micro-batch 4: even shards; 8 + 7; 5 + 4, where rank 1 runs a filler
# micro-batch (2 vs 1 needed) so both make the same collectives.
BATCHES = [(1, 4, 4), (2, 5, 3), (3, 3, 3)]
TOKENS = 16 * 8  # the most completion tokens a step sums gradient terms over (16 rows of <= 8)
LOGPROB_ERR = 2e-5  # two float32 forwards of the tiny model in other batch shapes (test_prompt_sharing)
# The loss: Σ_t A_t·w_t / N with ratio exactly 1 (one pass) and w_t <= tis_cap, so its size is at most
# S = Σ_t |A_t|·tis_cap / N. Summed in another order over <= TOKENS terms: <= TOKENS·EPS32·S (Higham's
# γ_n); each w_t = exp(logp - sampler) carries logp's error: <= LOGPROB_ERR·S. Bound: their sum.
LOSS_RTOL_OF_SIZE = TOKENS * EPS32 + LOGPROB_ERR
# The gradient: the same terms times d logp / dθ, so the same model, relative to Σ|terms|; GRPO's terms
# cancel (advantages sum to 0 in each group) to ~1/10 of their absolute sum: |δg| / |g| <= 10·that.
GRAD_RTOL = 10 * LOSS_RTOL_OF_SIZE


def _config(zero_stage: int) -> RunConfig:
    overrides = ["learner.micro_batch_size=4", "learner.threads=1", "learner.num_cpus=1"]
    return load_config(ROOT / "configs" / "demo.yaml", [*overrides, f"learner.zero_stage={zero_stage}"])


def _batch(seed: int, prompts: int, group_size: int, vocab: int = 128, max_new: int = 8) -> Batch:
    """Random tokens and sampler logprobs; rewards 0/1 plus noise (spread: non-zero advantages), one masked."""
    rng = random.Random(seed)
    groups, rewards = [], []
    for p in range(prompts):
        completions = []
        for _ in range(group_size):
            n = rng.randint(1, max_new)
            tokens = [rng.randrange(3, vocab) for _ in range(n)]
            completions.append(Completion(tokens, [rng.uniform(-6.0, -3.0) for _ in range(n)], "length", ""))
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(3, 10))]
        groups.append(Group(p, prompt, completions, policy_version=0, worker=0))
        row: list[float | None] = [float(rng.random() < 0.5) + rng.uniform(0, 0.1) for _ in range(group_size)]
        if p == 1:
            row[0] = None
        rewards.append(row)
    return Batch(groups, rewards, max_new)


def _pad_id(tiny_model: Path) -> int:
    from transformers import AutoTokenizer

    from cluster.data.encoding import pad_id_of

    return pad_id_of(AutoTokenizer.from_pretrained(str(tiny_model)))


@pytest.fixture(scope="module")
def one(ray_session: list[str], tiny_model: Path) -> Iterator[Any]:
    """A one-rank group (the plain Learner actor) that replays the two-rank groups' steps."""
    from cluster.placement import start_learner_group

    group = start_learner_group(_config(0), str(tiny_model), _pad_id(tiny_model), world_size=1)
    yield group
    group.stop()


@pytest.fixture(scope="module")
def after_step_1(one: Any) -> dict[str, Any]:
    """The one-rank learner's checkpoint after step 1 from its initial state (what a resume loads)."""
    one.train_step(_batch(*BATCHES[0]))
    return one.checkpoint_state()


def _rank_states(group: Any) -> list[dict[str, torch.Tensor]]:
    import ray

    return list(ray.get([rank.lora_state.remote() for rank in group.ranks]))


def _assert_ranks_identical(states: list[dict[str, torch.Tensor]]) -> None:
    first, *others = states
    for other in others:
        assert other.keys() == first.keys()
        for name in first:
            assert torch.equal(first[name], other[name]), f"ranks differ in {name}"


def _assert_same_state(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    """A restored state is a copy (no arithmetic): adapter and AdamW moments bit for bit."""
    assert ours["adapter"].keys() == theirs["adapter"].keys()
    for name, tensor in theirs["adapter"].items():
        assert torch.equal(ours["adapter"][name], tensor), name
    assert ours["optimizer"]["state"].keys() == theirs["optimizer"]["state"].keys()
    for i, entry in theirs["optimizer"]["state"].items():
        for key, tensor in entry.items():
            assert torch.equal(ours["optimizer"]["state"][i][key], tensor), (i, key)


Snapshot = tuple[dict[str, Any], dict[str, torch.Tensor]]  # (checkpoint, rank 0's named LoRA tensors)


def _snapshot(group: Any) -> Snapshot:
    states = _rank_states(group)
    _assert_ranks_identical(states)
    return group.checkpoint_state(), states[0]


def _step_like_one_rank(group: Any, one: Any, batch: Batch, what: str, start: Snapshot) -> Snapshot:
    """The group takes one step from `start` (its current state); `one` replays it from there; both
    are compared. Returns the group's state after the step."""
    before, weights_before = start
    one.restore(before, version=before["version"])
    expected, theirs = one.train_step(batch), one.checkpoint_state()

    metrics = group.train_step(batch)
    ours, weights = _snapshot(group)
    assert any(not torch.equal(t, weights_before[n]) for n, t in weights.items()), "the adapter did not move"
    assert ours["optimizer"]["param_groups"] == theirs["optimizer"]["param_groups"]
    assert ours["scheduler"] == theirs["scheduler"] and ours["version"] == theirs["version"]

    _assert_metrics_match(metrics, expected, batch, what)
    hyper = before["optimizer"]["param_groups"][0]
    shapes = [t.shape for t in weights.values()]
    _assert_gradients_match(*(_moments(s, shapes) for s in (before, ours, theirs)), hyper["betas"], what)
    _assert_adamw_update(weights_before, weights, _moments(ours, shapes), ours, hyper, what)
    return ours, weights


def _moments(
    state: dict[str, Any], shapes: list[torch.Size]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """AdamW's first and second moment of each trainable tensor, in float64 (zeros before a first step)."""
    entries = state["optimizer"]["state"]
    if not entries:
        zeros = [torch.zeros(s, dtype=torch.float64) for s in shapes]
        return zeros, zeros
    assert len(entries) == len(shapes)
    first = [entries[i]["exp_avg"].double() for i in range(len(shapes))]
    second = [entries[i]["exp_avg_sq"].double() for i in range(len(shapes))]
    return first, second


def _assert_metrics_match(
    metrics: dict[str, float], expected: dict[str, float], batch: Batch, what: str
) -> None:
    from learner.learner import batch_targets

    assert metrics.keys() == expected.keys()
    assert metrics["train/num_tokens"] == expected["train/num_tokens"]
    # The same |A| (all > 0, no cancellation) averaged in float32 by the one rank and in Python floats
    # for the group: the float32 mean of <= 16 terms is within 16·EPS32/2 of exact; we allow 16·EPS32.
    abs_a, abs_a_one = metrics["train/advantage_abs_mean"], expected["train/advantage_abs_mean"]
    within(f"{what} mean|A| relative gap", abs(abs_a - abs_a_one) / abs_a_one, 16 * EPS32)

    loss_cfg = _config(0).learner.loss
    assert loss_cfg.tis_cap is not None and loss_cfg.aggregation == "token_mean"  # the loss model's premises
    advantages_B, valid_B, normaliser = batch_targets(batch, loss_cfg)
    lengths_B = torch.tensor([len(c.token_ids) for g in batch.groups for c in g.completions])
    size = float((advantages_B.abs() * lengths_B * valid_B).sum()) * loss_cfg.tis_cap / normaliser
    loss_gap = abs(metrics["train/loss"] - expected["train/loss"])
    within(f"{what} loss gap / Σ|terms|", loss_gap / size, LOSS_RTOL_OF_SIZE)
    # ||a| - |b|| <= |a - b|: the norm's relative gap is at most the gradient's
    norm_gap = abs(metrics["train/grad_norm"] - expected["train/grad_norm"]) / expected["train/grad_norm"]
    within(f"{what} grad_norm relative gap", norm_gap, GRAD_RTOL)


def _assert_gradients_match(
    before: tuple[list[torch.Tensor], list[torch.Tensor]],
    ours: tuple[list[torch.Tensor], list[torch.Tensor]],
    theirs: tuple[list[torch.Tensor], list[torch.Tensor]],
    betas: tuple[float, float],
    what: str,
) -> None:
    """The gradients (after clipping) that reached AdamW, from the moments it stored (the same `before`)."""
    b1, b2 = betas

    def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.flatten() for t in tensors])

    (m_prev, _), (m_ours, v_ours), (m_theirs, v_theirs) = before, ours, theirs
    g = (flat(m_theirs) - b1 * flat(m_prev)) / (1 - b1)
    dg = (flat(m_ours) - flat(m_theirs)) / (1 - b1)
    within(f"{what} gradient (exp_avg) relative L2 gap", float(dg.norm() / g.norm()), GRAD_RTOL)
    # v moves by (1 - b2)·g², and |g'² - g²| <= |δg|·(2|g| + |δg|): a bound from the gradient's
    dv = (flat(v_ours) - flat(v_theirs)) / (1 - b2)
    reach = (2 * g.abs().max() + dg.abs().max()) * g.norm()
    within(f"{what} gradient² (exp_avg_sq) gap / (2|g|∞+|δg|∞)|g|", float(dv.norm() / reach), GRAD_RTOL)


def _assert_adamw_update(
    weights_before: dict[str, torch.Tensor],
    weights: dict[str, torch.Tensor],
    moments: tuple[list[torch.Tensor], list[torch.Tensor]],
    state: dict[str, Any],
    hyper: dict[str, Any],
    what: str,
) -> None:
    """The group's new weights are torch AdamW's step from its own moments, recomputed in float64."""
    (b1, b2), lr, eps = hyper["betas"], hyper["lr"], hyper["eps"]
    step = float(state["optimizer"]["state"][0]["step"])
    worst = 0.0
    for w, w0, m, v in zip(weights.values(), weights_before.values(), *moments, strict=True):
        u = (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps)
        expected = w0.double() * (1 - lr * hyper["weight_decay"]) - lr * u
        # float32 AdamW rounds u in <= 7 operations (sqrt, two divisions, + eps, the step size and its
        # product) and the weight in <= 2 (decay, update): |err| <= EPS32/2·(7·lr·|u| + 2·|w|); allow 2x
        model = EPS32 / 2 * (7 * lr * u.abs() + 2 * w0.double().abs()) + torch.finfo(torch.float32).tiny
        worst = max(worst, float(((w.double() - expected).abs() / model).max()))
    within(f"{what} weights - AdamW(own moments), in units of its rounding bound", worst, 2.0)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_two_ranks_train_like_one(
    zero_stage: int, one: Any, after_step_1: dict[str, Any], tiny_model: Path
) -> None:
    from cluster.placement import start_learner_group

    group = start_learner_group(_config(zero_stage), str(tiny_model), _pad_id(tiny_model), world_size=2)
    try:
        state = _snapshot(group)
        for step, spec in enumerate(BATCHES, start=1):
            state = _step_like_one_rank(group, one, _batch(*spec), f"zero{zero_stage} step {step}", state)

        # restoring a one-rank checkpoint (after step 1) puts every rank back there: step 2 again
        group.restore(after_step_1, version=1)
        state = _snapshot(group)
        _assert_same_state(state[0], after_step_1)
        _step_like_one_rank(group, one, _batch(*BATCHES[1]), f"zero{zero_stage} step 2 after restore", state)
    finally:
        group.stop()


def test_fresh_ranks_resume_a_one_rank_checkpoint(
    one: Any, after_step_1: dict[str, Any], tiny_model: Path
) -> None:
    """Resume as a run does: new ZeRO-2 ranks load a checkpoint before their first step."""
    from cluster.placement import start_learner_group

    group = start_learner_group(_config(2), str(tiny_model), _pad_id(tiny_model), world_size=2)
    try:
        group.restore(after_step_1, version=1)
        state = _snapshot(group)
        _assert_same_state(state[0], after_step_1)
        for step in (2, 3):
            state = _step_like_one_rank(group, one, _batch(*BATCHES[step - 1]), f"resumed step {step}", state)
    finally:
        group.stop()


def test_the_adapter_config_reaches_the_driver_as_plain_json(after_step_1: dict[str, Any]) -> None:
    """Only built-in types: the driver unpickles checkpoint states and must not import peft for it
    (PEFT's str-enums would pull in peft and transformers, ~5 CPU s, mid-run)."""

    def plain(value: Any) -> bool:
        if isinstance(value, dict):
            return all(type(k) is str and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return type(value) in (str, int, float, bool, type(None))

    config = after_step_1["adapter_config"]
    assert config["peft_type"] == "LORA" and plain(config), config
