"""Rollout-side settings: how many vLLM engines, what each may use, how they sample.

Imports only pydantic, so `grpo-ray check` validates a config without torch, vLLM or Ray.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from grpo_ray.config_base import MAX_TOKENS, MAX_WORKERS, Strict


class SamplingConfig(Strict):
    temperature: float = Field(
        1.0, gt=0, le=100, description="Sampling temperature; the learner divides its logits by it too."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass; keep 1.0 for unbiased GRPO.")
    top_k: int = Field(
        -1,
        ge=-1,
        le=MAX_TOKENS,
        description="Top-k sampling; -1 disables it (keep it off for unbiased GRPO).",
    )
    max_new_tokens: int = Field(
        64, ge=1, le=MAX_TOKENS, description="Longest completion; longer ones are truncated and counted."
    )

    @field_validator("top_k")
    @classmethod
    def _top_k_not_zero(cls, value: int) -> int:
        if value == 0:
            raise ValueError("top_k = 0 keeps no token; use -1 to disable top-k, or a positive k")
        return value


class RolloutConfig(Strict):
    num_workers: int = Field(
        2, ge=1, le=MAX_WORKERS, description="Number of RolloutWorker actors, each owning one vLLM engine."
    )
    num_cpus_per_worker: float = Field(
        1.0, gt=0, le=1024, description="Ray CPUs reserved for each rollout worker."
    )
    num_gpus_per_worker: float = Field(
        0.0, ge=0, le=64, description="Ray GPUs reserved for each rollout worker (0 on CPU)."
    )
    tensor_parallel_size: int = Field(
        1, ge=1, le=64, description="vLLM tensor parallelism inside one rollout worker."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="dtype the engine runs in; merged weights are built in it."
    )
    max_model_len: int = Field(
        512, ge=16, le=MAX_TOKENS, description="Longest prompt+completion the engine accepts."
    )
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="GPU only: fraction of device memory vLLM may take (split placement)."
    )
    kv_cache_mb: int = Field(
        256,
        ge=1,
        le=1 << 24,  # 16 TiB
        description="CPU only: KV cache size in MiB (vLLM's RAM fraction is unsafe on CPU).",
    )
    enforce_eager: bool = Field(
        True, description="Skip CUDA graph / compile warm-up; faster start, slower decode."
    )
    enable_prefix_caching: bool = Field(
        True, description="Share the prompt's KV cache across the group's samples."
    )
    cpu_cores: list[int] | None = Field(
        None,
        min_length=1,
        description="CPU only: pin each engine's process (every worker on the same cores) to these core ids, e.g. [1] (null: not pinned).",
    )
    threads_per_worker: int = Field(
        1, ge=1, le=1024, description="CPU only: torch/OpenMP threads each engine uses."
    )
    prompts_per_chunk: int = Field(
        4,
        ge=1,
        le=1 << 20,
        description="Prompts per generate call: idle workers pull chunks of this many from the step's "
        "queue (what is sampled depends on the chunks, never on which worker ran them).",
    )
    max_restarts: int = Field(
        3,
        ge=0,
        le=1000,
        description="Restarts of one worker slot after it dies before it is dropped (crash loop).",
    )
    restart_timeout_s: float = Field(
        600.0,
        gt=0,
        le=7 * 24 * 3600,
        description="A restarted or added worker whose engine is not up this long counts as dead.",
    )
    worker_merge_base: Literal["device", "host"] = Field(
        "device",
        description="sync: worker_merge: keep the packed base on the engine's GPU (~0.52 B/param of its "
        "memory) or in host RAM (copied to the GPU each sync); the same on CPU.",
    )
    sampling: SamplingConfig = Field(
        default_factory=SamplingConfig, description="How completions are sampled."
    )
