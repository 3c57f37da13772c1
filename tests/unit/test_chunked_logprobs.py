"""Chunked log-probabilities equal the unchunked path: values, entropy and LoRA gradients.

Real model (the shipped tiny Qwen2: hidden 128, vocab 320), real PEFT LoRA, 4-bit and plain, both
micro-batch layouts (plain and prompt-shared), temperature 0.7, chunk sizes that do and do not divide
the 21 scored tokens. Error model used below, u = 2^-24 (float32 unit roundoff), gamma_n = n u:

* logits: a chunk's GEMM may sum each length-H dot product in another order than the whole-batch
  GEMM; each order is within gamma_H * S of the exact value (Higham, Thm 3.1), S = max over tokens
  and vocab entries of sum_k |h_k w_vk|, so the two differ by <= 2 gamma_H S, and after / tau and a
  log-softmax (which moves log p_y by <= |dz_y| + max_v |dz_v|) log-probs differ by <= 4 gamma_H S / tau.
* gradients: the decoder runs the same code on the same inputs in both paths; only the gradient
  reaching the final hidden state differs, by the order of the length-V sum (onehot - p) W: relative
  <= 2 gamma_V. The backward is linear in that gradient; allowing 10x for cancellation in its sums,
  every LoRA gradient agrees within 20 gamma_V of its own largest entry.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from grpo_ray.records import Batch, Completion, Group
from learner.chunked_logprobs import chunked_token_logprobs
from learner.config import LearnerConfig
from learner.grpo import entropy_from_logits
from learner.learner import Learner
from learner.logprobs import completion_logprobs, output_layer_as_identity, pack, pack_sharing_prompts
from learner.model import load_policy

U32 = 2.0**-24
PROMPTS = [[5, 17, 9, 33, 2], [7, 8], [5, 17, 9, 33, 2], [40, 41, 42, 43, 44, 45, 46], [7, 8], [7, 8]]
COMPLETIONS = [[11, 12, 13], [21], [14, 15, 16, 17, 18, 19], [22, 23, 24, 25], [26, 27, 28, 29, 30], [31, 32]]
TOKENS = sum(len(c) for c in COMPLETIONS)  # 21
TAU = 0.7


def _policy(tiny_model: Path, quantization: str) -> torch.nn.Module:
    policy = load_policy(
        str(tiny_model), LearnerConfig(quantization=quantization, compute_dtype="float32"), 0, "cpu"
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-zero adapter, so the gradient reaches every LoRA factor
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    policy.train()
    return policy


def _run(
    policy: torch.nn.Module, packed: object, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    policy.zero_grad(set_to_none=True)
    logprobs_B_T, entropy_B_T = completion_logprobs(
        policy,
        packed,
        TAU,
        with_entropy=True,
        chunk_tokens=chunk,  # type: ignore[arg-type]
    )
    mask_B_T = packed.completion_mask_B_T  # type: ignore[attr-defined]
    weights_B_T = torch.linspace(-1.0, 1.0, logprobs_B_T.numel()).reshape(logprobs_B_T.shape)
    (logprobs_B_T * weights_B_T * mask_B_T).sum().backward()
    grads = [p.grad.clone() for p in policy.parameters() if p.requires_grad and p.grad is not None]
    assert entropy_B_T is not None
    return logprobs_B_T.detach() * mask_B_T, entropy_B_T * mask_B_T, grads


def _logit_scale(policy: torch.nn.Module, packed: object) -> float:
    """S = max_{t,v} sum_k |h_tk| |w_vk| over the scored positions."""
    with torch.no_grad(), output_layer_as_identity(policy) as head:
        hidden = packed.scoring_outputs(policy)[packed.completion_mask_B_T]  # type: ignore[attr-defined]
        return float((hidden.abs() @ head.weight.abs().T).max())


@pytest.mark.parametrize("quantization", ["nf4", "none"])
@pytest.mark.parametrize("layout", ["plain", "shared"])
def test_chunked_logprobs_and_lora_gradients_equal_the_unchunked_path(
    tiny_model: Path, quantization: str, layout: str
) -> None:
    policy = _policy(tiny_model, quantization)
    make = pack if layout == "plain" else pack_sharing_prompts
    packed = make(PROMPTS, COMPLETIONS, 0, "cpu")
    hidden_size, vocab = 128, 320
    logprob_tol = 4 * hidden_size * U32 * _logit_scale(policy, packed) / TAU
    full, full_entropy, full_grads = _run(policy, packed, chunk=0)
    assert len(full_grads) > 0 and all(bool(g.abs().max() > 0) for g in full_grads)
    for chunk in (1, 5, 7, TOKENS, 64):  # 5 does not divide 21, 7 does; 64 is one chunk
        got, entropy, grads = _run(policy, packed, chunk)
        torch.testing.assert_close(got, full, atol=logprob_tol, rtol=0)
        # entropy: the same sums as log-probs, over V terms of p |log p| <= log V in total
        torch.testing.assert_close(entropy, full_entropy, atol=logprob_tol * math.log(vocab), rtol=0)
        assert len(grads) == len(full_grads)
        for a, b in zip(grads, full_grads, strict=True):
            torch.testing.assert_close(a, b, atol=20 * vocab * U32 * float(b.abs().max()), rtol=0)


def test_single_token_completions_chunked(tiny_model: Path) -> None:
    # the shared layout then runs only the prompt forward (logits_to_keep): same values either way
    policy = _policy(tiny_model, "none")
    prompts, completions = [[5, 6, 7], [5, 6, 7], [9]], [[1], [2], [3]]
    for make in (pack, pack_sharing_prompts):
        packed = make(prompts, completions, 0, "cpu")
        with torch.no_grad():
            full, _ = completion_logprobs(policy, packed, TAU, chunk_tokens=0)
            got, _ = completion_logprobs(policy, packed, TAU, chunk_tokens=2)
        torch.testing.assert_close(got, full, atol=4 * 128 * U32 * _logit_scale(policy, packed) / TAU, rtol=0)


def test_the_chunked_function_is_the_log_softmax_gradient_in_float64() -> None:
    # float64 (u = 2^-53): every difference is rounding of ~ (H + V) terms, < 1e-12 here.
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=True).double().requires_grad_(False)
    targets = torch.randint(50, (13,), generator=gen)
    upstream = torch.randn(13, dtype=torch.float64, generator=gen)

    logits = head(hidden) / TAU
    expected = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), hidden)
    for chunk in (1, 4, 13, 100):
        got, entropy = chunked_token_logprobs(hidden, head, targets, TAU, chunk, with_entropy=True)
        (grad,) = torch.autograd.grad((got * upstream).sum(), hidden)
        torch.testing.assert_close(got, expected.detach(), atol=1e-12, rtol=0)
        torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=0)
        assert entropy is not None and not entropy.requires_grad
        torch.testing.assert_close(entropy, entropy_from_logits(logits.detach()), atol=1e-12, rtol=0)


def test_no_gradient_needed_no_jacobian_and_a_trainable_head_is_refused() -> None:
    head = torch.nn.Linear(8, 20, bias=False).requires_grad_(False)
    with torch.no_grad():
        got, entropy = chunked_token_logprobs(torch.randn(5, 8), head, torch.arange(5), 1.0, 2)
    assert got.shape == (5,) and entropy is None and not got.requires_grad
    with pytest.raises(ValueError, match=r"remove lm_head from learner\.lora\.target_modules"):
        chunked_token_logprobs(torch.randn(5, 8), torch.nn.Linear(8, 20), torch.arange(5), 1.0, 2)


def test_default_chunk_follows_the_vocabulary() -> None:
    cfg = LearnerConfig()
    # 2^27 / (4 * 151936) = 220.9 -> 192 (multiple of 32); 320 entries -> 104,857 -> 104,832
    assert (cfg.chunk_tokens_for(151_936), cfg.chunk_tokens_for(152_064), cfg.chunk_tokens_for(320)) == (
        192,
        192,
        104_832,
    )
    assert cfg.chunk_tokens_for(10**9) == 32
    assert LearnerConfig(logprob_chunk_tokens=0).chunk_tokens_for(151_936) == 0


def _batch() -> Batch:
    groups = [
        Group(0, PROMPTS[0], [Completion(c, [-5.0] * len(c), "stop", "") for c in COMPLETIONS[:3]], 0, 0),
        Group(1, PROMPTS[1], [Completion(c, [-6.0] * len(c), "stop", "") for c in COMPLETIONS[3:]], 0, 0),
    ]
    return Batch(groups, [[0.0, 1.0, 0.5], [1.0, 0.0, 0.0]], max_new_tokens=6)


@pytest.mark.parametrize(
    ("quantization", "share", "checkpointing"),
    [("nf4", True, False), ("none", True, False), ("nf4", False, True), ("none", False, True)],
)
def test_a_train_step_with_kl_and_tis_is_the_same_chunked(
    tiny_model: Path, quantization: str, share: bool, checkpointing: bool
) -> None:
    """KL to the adapter-disabled model (beta 0.1), truncated IS, temperature, micro-batches of 4."""
    results = []
    for chunk in (0, 5):
        cfg = LearnerConfig(
            quantization=quantization,
            compute_dtype="float32",
            micro_batch_size=4,
            share_prompt_forward=share,
            gradient_checkpointing=checkpointing,
            logprob_chunk_tokens=chunk,
            loss={"beta": 0.1, "tis_cap": 2.0},  # type: ignore[arg-type]
        )
        learner = Learner(str(tiny_model), cfg, seed=0, temperature=TAU, rollout_dtype="float32", pad_id=0)
        assert learner.chunk_tokens == chunk
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in learner.policy.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        metrics = learner.train_step(_batch())
        grads = [p.grad.clone() for p in learner.trainable]
        results.append((metrics, grads))
    (full_metrics, full_grads), (metrics, grads) = results
    for key in (
        "train/loss",
        "train/kl_mean",
        "train/entropy",
        "train/tis/ratio_mean",
        "sync/logprob_gap_max",
    ):
        # smooth functions of log-probs that agree to ~1e-6 (first test); the ratios and the k3 KL
        # exponentiate them, which turns an absolute 1e-6 into a relative one: allow 1e-5 relative
        assert metrics[key] == pytest.approx(full_metrics[key], rel=1e-5, abs=1e-6), key
    for a, b in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, atol=20 * 320 * U32 * float(b.abs().max()), rtol=0)
