"""Learner settings: the QLoRA model, the GRPO objective and the optimiser. Imports only pydantic."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from grpo_ray.config_base import MAX_COUNT, MAX_TOKENS, Strict

_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")

TARGET_PRESETS: dict[str, list[str]] = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def default_logprob_chunk_tokens(vocab_size: int) -> int:
    """2^27 / (4 V) tokens rounded down to a multiple of 32, at least 32: ~128 MiB of fp32 logits."""
    return max(32, (2**27 // (4 * vocab_size)) // 32 * 32)


class LoraSettings(Strict):
    rank: int = Field(16, ge=1, le=4096, description="LoRA rank r.")
    alpha: float = Field(32.0, gt=0, le=1e6, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout on the LoRA input (0 keeps learner and sampler identical)."
    )
    target_modules: Literal["attention", "all-linear"] | list[str] = Field(
        "all-linear", description="Preset name or an explicit list of linear-module names to adapt."
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError(
                "target_modules is empty: give a preset ('attention', 'all-linear') or module names"
            )
        bad = [name for name in value if isinstance(value, list) and not _MODULE_NAME.match(name)]
        if bad:
            raise ValueError(f"target_modules {bad} are not module names (e.g. 'q_proj')")
        return value

    def module_names(self) -> list[str]:
        """The concrete module names the adapter wraps."""
        if isinstance(self.target_modules, str):
            return list(TARGET_PRESETS[self.target_modules])
        return list(self.target_modules)


# How token losses become the batch loss; learner/grpo.py's `loss_normaliser` and `grpo_loss` define each.
Aggregation = Literal["token_mean", "seq_mean", "constant"]


class LossConfig(Strict):
    """The GRPO objective; `learner.grpo.grpo_loss` takes this object as is (validated once, here)."""

    clip_low: float = Field(
        0.2, ge=0, lt=1, description="Lower clip range: ratios below 1 - clip_low are clipped."
    )
    clip_high: float = Field(
        0.28,
        ge=0,
        le=100,
        description="Upper clip range (DAPO clip-higher): ratios above 1 + clip_high are clipped.",
    )
    beta: float = Field(
        0.0, ge=0, le=1e4, description="KL-to-reference coefficient (k3 estimator); 0 turns the KL term off."
    )
    aggregation: Aggregation = Field(
        "token_mean", description="How token losses are averaged; 'constant' is Dr. GRPO's fixed normaliser."
    )
    scale_advantages_by_std: bool = Field(
        True, description="Divide advantages by the group std (False = Dr. GRPO)."
    )
    tis_cap: float | None = Field(
        2.0,
        gt=0,
        le=1e6,
        description="Truncated importance sampling cap for sampler/learner mismatch; null turns it off.",
    )


class LearnerConfig(Strict):
    quantization: Literal["nf4", "none"] = Field(
        "nf4", description="'nf4': 4-bit NF4 base (QLoRA); 'none': plain LoRA."
    )
    double_quant: bool = Field(True, description="Quantize the NF4 scales too (saves ~0.4 bit/param).")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16",
        description="dtype the 4-bit layers dequantize to for matmuls, and the LoRA weights' dtype.",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="The adapter that is trained.")
    loss: LossConfig = Field(default_factory=LossConfig, description="The GRPO objective.")
    learning_rate: float = Field(
        1e-5, gt=0, le=10, description="AdamW learning rate for the LoRA parameters."
    )
    weight_decay: float = Field(0.0, ge=0, le=10, description="AdamW weight decay.")
    warmup_steps: int = Field(
        0, ge=0, le=MAX_COUNT, description="Linear learning-rate warm-up, in optimiser steps."
    )
    max_grad_norm: float = Field(1.0, gt=0, le=1e9, description="Global gradient-norm clip.")
    micro_batch_size: int = Field(
        8,
        ge=1,
        le=MAX_TOKENS,
        description="Sequences per forward/backward; gradients accumulate over a step.",
    )
    passes: int = Field(
        1, ge=1, le=1024, description="Optimisation passes over each step's batch (1 = strictly on-policy)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory."
    )
    logprob_chunk_tokens: int | None = Field(
        None,
        ge=0,
        description="Tokens per chunk when log-probabilities are computed from the final hidden states "
        "(output layer, log-softmax and gather per chunk; no [tokens x vocab] logits are kept). null: "
        "derived from the vocabulary size (`chunk_tokens_for`); 0: all tokens at once, the unchunked path.",
    )
    share_prompt_forward: bool = Field(
        True,
        description="Run each distinct prompt of a micro-batch once and continue its completions from "
        "that KV cache (exact; saves group_size - 1 prompt forwards per group).",
    )
    num_gpus: int = Field(
        0,
        ge=0,
        le=4096,
        description="GPUs for the learner (0 = CPU); >1 trains data-parallel with DeepSpeed.",
    )
    # Not 3: ZeRO-3 partitions every parameter of the module, the frozen 4-bit base included.
    zero_stage: int = Field(
        0, ge=0, le=2, description="DeepSpeed ZeRO stage over the LoRA parameters when data-parallel (0-2)."
    )
    num_cpus: float = Field(1.0, ge=0, le=1024, description="Ray CPUs reserved for the learner.")
    cpu_cores: list[int] | None = Field(
        None,
        min_length=1,
        description="CPU only: pin the learner's process to these core ids, e.g. [1] (null: not pinned).",
    )
    threads: int = Field(2, ge=1, le=1024, description="CPU only: torch threads the learner uses.")

    def chunk_tokens_for(self, vocab_size: int) -> int:
        """Tokens per log-probability chunk for a vocabulary of `vocab_size` entries; 0 = unchunked.

        The default holds one chunk's float32 logits to about 128 MiB: 2^27 / (4 V) tokens, rounded
        down to a multiple of 32 (at least 32): 192 for Qwen2.5's 151,936 or 152,064 entries, and
        104,832 for the 320-entry test vocabulary (one chunk per micro-batch).
        """
        if self.logprob_chunk_tokens is not None:
            return self.logprob_chunk_tokens
        return default_logprob_chunk_tokens(vocab_size)

    @model_validator(mode="after")
    def _sharing_needs_a_cache(self) -> LearnerConfig:
        if self.gradient_checkpointing and self.share_prompt_forward:
            # transformers drops the KV cache of a checkpointed forward, and the completions need it.
            raise ValueError(
                "learner.gradient_checkpointing and learner.share_prompt_forward cannot both be on: "
                "set learner.share_prompt_forward: false to save memory with checkpointing, or turn "
                "checkpointing off to share the prompt forward"
            )
        return self
