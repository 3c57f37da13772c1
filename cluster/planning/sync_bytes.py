"""Bytes one policy sync puts in the object store, per sync mode, from a model's shape alone.

Pure arithmetic (no torch) over what learner/learner.py exports, so `grpo-ray check` can say what
each mode costs before anything loads. One copy per sync: every rollout worker fetches that copy, so
a cluster moves it once to every node that hosts a worker.

merged        per step: the adapted linears closed under vLLM's fusion, dense in the rollout dtype
              (+ q/k/v biases); first sync: every 4-bit linear too.
adapter       per step: LoRA A and B in fp32; first sync: every 4-bit linear dequantized (NF4).
worker_merge  per step: LoRA A and B in fp32; first sync: every base linear as the learner stores
              it (NF4 codes + quantization state, or dense in the learner dtype) + biases + LoRA.
The per-tensor quantization constants (< 1.2 KiB per linear, see memory.py) are left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster.planning.memory import (
    DTYPE_BYTES,
    LORA_BYTES,
    ModelShape,
    base_layer_bytes,
    fused_closure,
    lora_params,
)

if TYPE_CHECKING:
    from cluster.config import RunConfig


@dataclass(frozen=True)
class SyncBytes:
    """Object-store bytes of the run's first sync and of every later one."""

    first: int
    per_step: int


def sync_bytes(cfg: RunConfig, shape: ModelShape, mode: str | None = None) -> SyncBytes:
    """SyncBytes for `mode` (default: the config's own `sync`)."""
    mode = mode or cfg.sync
    learner = cfg.learner
    nf4 = learner.quantization == "nf4"
    rollout_b, learner_b = DTYPE_BYTES[cfg.rollout.dtype], DTYPE_BYTES[learner.compute_dtype]
    layers, shapes = shape.num_hidden_layers, shape.linear_shapes()
    closure = fused_closure(learner.lora.module_names())
    every = set(shapes) if nf4 else closure  # the layers a first sync rebuilds

    def dense(names: set[str], nbytes: int) -> int:
        biases = shape.q_dim + 2 * shape.kv_dim if shape.qkv_bias and "q_proj" in names else 0
        return layers * (sum(a * b for n, (a, b) in shapes.items() if n in names) + biases) * nbytes

    lora = lora_params(shape, learner.lora.rank, learner.lora.module_names()) * LORA_BYTES
    if mode == "merged":
        return SyncBytes(first=dense(every, rollout_b), per_step=dense(closure, rollout_b))
    if mode == "adapter":
        return SyncBytes(first=(dense(every, rollout_b) if nf4 else 0) + lora, per_step=lora)
    if mode == "worker_merge":
        base = base_layer_bytes(shape, every, learner.quantization, learner.double_quant, learner_b)
        return SyncBytes(first=base + lora, per_step=lora)
    raise ValueError(f"unknown sync mode '{mode}': use merged, adapter or worker_merge")


def worker_merge_advice(cfg: RunConfig, shape: ModelShape) -> str | None:
    """One line recommending sync: worker_merge where it helps (split placement), with why; else None."""
    if cfg.placement != "split" or cfg.sync == "worker_merge":
        return None
    ours, alternative = sync_bytes(cfg, shape), sync_bytes(cfg, shape, "worker_merge")
    why = (
        f"it moves {_mb(alternative.per_step)} MB of LoRA per sync instead of {_mb(ours.per_step)} MB of merged "
        f"weights to each rollout node (base sent once: {_mb(alternative.first)} MB)"
        if cfg.sync == "merged"
        else "the engines then decode on merged weights, not through vLLM's slower LoRA path, at the same "
        f"{_mb(alternative.per_step)} MB per sync"
    )
    return f"sync: consider worker_merge ({cfg.sync} now): {why}"


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f}"
