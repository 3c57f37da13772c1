"""What a memory estimate depends on (`MemoryInputs`), filled from a run config, and shared units."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster.planning.shapes import LINEAR_NAMES, ModelShape
from learner.config import default_logprob_chunk_tokens

if TYPE_CHECKING:
    from cluster.config import RunConfig

GiB = 2**30
MiB = 2**20

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# A CUDA context with cuBLAS handles and workspaces: ~300-500 MiB per process on CUDA 12 with lazy
# module loading; 512 MiB is the allowance. The learner and the engine are separate processes
# (Ray actors), so each pays one.
CUDA_CONTEXT_BYTES = 512 * MiB


@dataclass(frozen=True)
class MemoryInputs:
    """Everything the estimate depends on; `inputs_from_config` fills it from a RunConfig."""

    shape: ModelShape
    quantization: str  # "nf4" | "none"
    double_quant: bool
    compute_bytes: int  # learner compute dtype: LoRA weights, dense weights, activations
    rollout_bytes: int  # vLLM dtype: its weights and KV cache
    lora_rank: int
    lora_targets: list[str]
    micro_batch_size: int
    max_prompt_tokens: int
    max_new_tokens: int
    gradient_checkpointing: bool
    rollout_sequences: int  # concurrent sequences one engine holds (prompts per engine x group)
    device_bytes: int
    placement: str  # "colocate" | "split"
    enforce_eager: bool = True  # False: vLLM captures CUDA graphs (CUDA_GRAPH_BYTES more)
    worker_base_on_device: bool = False  # sync: worker_merge with rollout.worker_merge_base: device
    # learner.logprob_chunk_tokens: tokens per log-probability chunk; None = the learner's default for
    # this vocabulary, 0 = unchunked (the whole [tokens x vocab] logits at once)
    logprob_chunk_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.quantization not in ("nf4", "none"):
            raise ValueError(f"quantization must be 'nf4' or 'none', got {self.quantization!r}")
        if self.placement not in ("colocate", "split"):
            raise ValueError(f"placement must be 'colocate' or 'split', got {self.placement!r}")
        counts = (
            "micro_batch_size",
            "max_prompt_tokens",
            "max_new_tokens",
            "rollout_sequences",
            "device_bytes",
        )
        small = [name for name in counts if getattr(self, name) < 1]
        if small:
            raise ValueError(f"{', '.join(small)} must be at least 1")
        unknown = sorted(set(self.lora_targets) - set(LINEAR_NAMES))
        if unknown:
            raise ValueError(
                f"cannot size LoRA on {unknown}: the planner knows the decoder linears {list(LINEAR_NAMES)}"
            )

    @property
    def chunk_tokens(self) -> int:
        """Tokens per log-probability chunk as the learner resolves it (0 = unchunked)."""
        if self.logprob_chunk_tokens is not None:
            return self.logprob_chunk_tokens
        return default_logprob_chunk_tokens(self.shape.vocab_size)

    @property
    def sequence_tokens(self) -> int:
        """L: the longest prompt + completion."""
        return self.max_prompt_tokens + self.max_new_tokens


def inputs_from_config(cfg: RunConfig, shape: ModelShape, device_gib: float = 24.0) -> MemoryInputs:
    """MemoryInputs for a validated RunConfig on devices of `device_gib` GiB each.

    One engine holds ceil(prompts_per_step / num_workers) prompts x group_size sequences at once.
    """
    learner, rollout = cfg.learner, cfg.rollout
    prompts_per_engine = math.ceil(cfg.prompts_per_step / rollout.num_workers)
    return MemoryInputs(
        shape=shape,
        quantization=learner.quantization,
        double_quant=learner.double_quant,
        compute_bytes=DTYPE_BYTES[learner.compute_dtype],
        rollout_bytes=DTYPE_BYTES[rollout.dtype],
        lora_rank=learner.lora.rank,
        lora_targets=learner.lora.module_names(),
        micro_batch_size=learner.micro_batch_size,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        max_new_tokens=rollout.sampling.max_new_tokens,
        gradient_checkpointing=learner.gradient_checkpointing,
        rollout_sequences=prompts_per_engine * cfg.group_size,
        device_bytes=int(device_gib * GiB),
        placement=cfg.placement,
        enforce_eager=rollout.enforce_eager,
        worker_base_on_device=cfg.sync == "worker_merge" and rollout.worker_merge_base == "device",
        logprob_chunk_tokens=learner.logprob_chunk_tokens,
    )
