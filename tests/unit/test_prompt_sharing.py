"""The shared-prompt forward is the plain forward computed with fewer FLOPs: same logprobs, same gradients.

Real model (the shipped tiny Qwen2, 4-bit and plain), real PEFT LoRA; prompts of different lengths,
completions of different lengths, rows of one prompt interleaved with another's.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from bounds import TINY_PATH_TERMS, forward_atol, logprob_atol, max_gap, within

from grpo_ray.records import Batch, Completion, Group
from learner.config import LearnerConfig
from learner.learner import Learner
from learner.logprobs import completion_logprobs, pack, pack_sharing_prompts
from learner.model import load_policy

PROMPTS = [[5, 17, 9, 33, 2], [7, 8], [5, 17, 9, 33, 2], [40, 41, 42, 43, 44, 45, 46], [7, 8], [7, 8]]
COMPLETIONS = [[11, 12, 13], [21], [14, 15, 16, 17, 18, 19], [22, 23, 24, 25], [26, 27, 28, 29, 30], [31, 32]]
TEMPERATURE = 0.7


def _max_abs_logit(policy: torch.nn.Module, prompts: list[list[int]], completions: list[list[int]]) -> float:
    with torch.no_grad():
        return float(policy(input_ids=pack(prompts, completions, 0, "cpu").input_ids_B_L).logits.abs().max())


def _logprobs_and_grads(policy: torch.nn.Module, packed: object) -> tuple[torch.Tensor, list[torch.Tensor]]:
    policy.zero_grad(set_to_none=True)
    logprobs_B_T, _ = completion_logprobs(policy, packed, temperature=TEMPERATURE)  # type: ignore[arg-type]
    weights_B_T = torch.linspace(-1.0, 1.0, logprobs_B_T.numel()).reshape(logprobs_B_T.shape)
    mask = packed.completion_mask_B_T  # type: ignore[attr-defined]
    (logprobs_B_T * weights_B_T * mask).sum().backward()
    grads = [p.grad.clone() for p in policy.parameters() if p.requires_grad and p.grad is not None]
    return logprobs_B_T.detach() * mask, grads


@pytest.mark.numeric
@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_shared_prompt_forward_matches_the_plain_one(tiny_model: Path, quantization: str) -> None:
    torch.manual_seed(0)
    cfg = LearnerConfig(quantization=quantization, compute_dtype="float32")
    policy = load_policy(str(tiny_model), cfg, seed=0, device="cpu")
    with torch.no_grad():  # a non-zero adapter, so the gradient reaches every LoRA factor
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    policy.train()

    plain, plain_grads = _logprobs_and_grads(policy, pack(PROMPTS, COMPLETIONS, 0, "cpu"))
    shared_batch = pack_sharing_prompts(PROMPTS, COMPLETIONS, 0, "cpu")
    assert shared_batch.prompt_ids_U_P.shape[0] == 3, "six rows, three distinct prompts"
    shared, shared_grads = _logprobs_and_grads(policy, shared_batch)

    # one float32 function in two orders (other GEMM shapes, attention over a cache): the forward model
    atol = logprob_atol(_max_abs_logit(policy, PROMPTS, COMPLETIONS), TEMPERATURE)
    within("shared vs plain logprobs", max_gap(shared, plain), atol)
    assert len(shared_grads) == len(plain_grads) > 0
    for a, b in zip(shared_grads, plain_grads, strict=True):
        # Backward runs the path twice over (2·TINY_PATH_TERMS sums), and the token weights in [-1, 1]
        # make the 21 tokens' terms cancel: measured Σ_t|g_t| <= 10·|Σ_t g_t| per tensor (max entry).
        grad_atol = forward_atol(10 * float(b.abs().max()), 2 * TINY_PATH_TERMS)
        within("shared vs plain LoRA gradient", max_gap(a, b), grad_atol)


@pytest.mark.numeric
def test_single_token_completions_need_only_the_prompt_forward(tiny_model: Path) -> None:
    policy = load_policy(str(tiny_model), LearnerConfig(quantization="none"), seed=0, device="cpu")
    prompts, completions = [[5, 6, 7], [5, 6, 7], [9]], [[1], [2], [3]]
    with torch.no_grad():
        plain, _ = completion_logprobs(policy, pack(prompts, completions, 0, "cpu"), 1.0)
        shared, _ = completion_logprobs(policy, pack_sharing_prompts(prompts, completions, 0, "cpu"), 1.0)
    # the same forward model as above, at temperature 1
    atol = logprob_atol(_max_abs_logit(policy, prompts, completions))
    within("single-token shared vs plain logprobs", max_gap(shared, plain), atol)


def test_an_empty_prompt_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one prompt token"):
        pack_sharing_prompts([[], [1]], [[2], [3]], 0, "cpu")


def _batch() -> Batch:
    groups = [
        Group(
            0, [5, 17, 9, 33, 2], [Completion([11, 12, 13], [-1.0] * 3, "stop", "") for _ in range(3)], 0, 0
        ),
        Group(1, [7, 8], [Completion([21, 22], [-1.0] * 2, "stop", "") for _ in range(3)], 0, 0),
    ]
    return Batch(groups, [[0.0, 1.0, 0.5], [1.0, 0.0, 0.0]], max_new_tokens=4)


@pytest.mark.parametrize(
    ("overrides", "forwards"),
    [
        # truncated IS on (tis_cap 2.0 by default): the pre-update logprobs come from the update's own
        # forward, so one micro-batch costs one prompt forward + one completion forward, nothing more
        ({}, 2),
        ({"share_prompt_forward": False}, 1),
        ({"passes": 2}, 4),
        # dropout makes the training forward differ from the sampler's policy: one no-grad forward more
        ({"lora": {"dropout": 0.1}}, 2 + 2),
    ],
)
def test_a_train_step_runs_no_forward_it_does_not_need(
    tiny_model: Path, overrides: dict[str, object], forwards: int
) -> None:
    cfg = LearnerConfig(quantization="none", compute_dtype="float32", micro_batch_size=8, **overrides)  # type: ignore[arg-type]
    learner = Learner(str(tiny_model), cfg, seed=0, temperature=1.0, rollout_dtype="float32", pad_id=0)
    calls: list[int] = []
    learner.policy.get_base_model().register_forward_pre_hook(lambda *_: calls.append(1))

    metrics = learner.train_step(_batch())

    assert len(calls) == forwards
    assert math.isfinite(metrics["train/loss"])
    assert "sync/logprob_gap_max" in metrics  # measured from the update's forward too
