"""GPU memory planner: will this run fit on the device, and what `gpu_memory_utilization` does vLLM get?

Pure arithmetic over a model's `config.json` fields (no weights, no torch), the LoRA settings and the
batch shape. Every figure is an integer number of bytes with its formula in the docstring of the
function that computes it, derived from what this project's code allocates. The parts, one file each:

- `shapes.py`: the model's shape (`ModelShape`) from config.json, built-in Qwen2.5 shapes.
- `inputs.py`: `MemoryInputs` (everything an estimate depends on), `inputs_from_config`, units.
- `learner_memory.py`: QLoRA learner (`learner/model.py`, `learner/logprobs.py`): NF4 decoder linears
  (bitsandbytes layout), dense embeddings/norms/biases in the compute dtype, LoRA weights + grads +
  AdamW moments (all fp32: the learner keeps LoRA params in fp32, since a bf16 AdamW step on them
  rounds small updates away, and torch's AdamW allocates its moments with `zeros_like(param)`),
  activations saved for backward, the logits path (chunks of tokens x vocab when chunked), a fixed
  CUDA context + slack.
- `engine_memory.py`: vLLM: all parameters dense in the rollout dtype, the KV cache for every
  concurrent sequence at full length, the engine's profiling headroom, its CUDA context.
- `verdict.py`: device bytes per phase for the placement, the budget table, vLLM's memory fraction,
  and the knobs (with the bytes each frees) when a phase does not fit.

This module keeps every public name importable from one place.
"""

from __future__ import annotations

from cluster.planning.engine_memory import (
    CUDA_GRAPH_BYTES,
    FUSED_LINEARS,
    VLLM_PROFILE_DEFAULTS,
    VLLM_SAMPLER_COPIES,
    base_layer_bytes,
    fused_closure,
    kv_cache_bytes,
    rollout_components,
    vllm_headroom_bytes,
    vllm_profile_sizes,
    worker_packed_base_bytes,
)
from cluster.planning.inputs import (
    CUDA_CONTEXT_BYTES,
    DTYPE_BYTES,
    GiB,
    MemoryInputs,
    MiB,
    inputs_from_config,
)
from cluster.planning.learner_memory import (
    LEARNER_SLACK_BYTES,
    LORA_BYTES,
    NF4_BLOCK,
    NF4_NESTED_BLOCK,
    activation_bytes,
    layer_activation_bytes_per_token,
    learner_components,
    learner_resident,
    logits_bytes,
    lora_params,
    nf4_tensor_bytes,
    nf4_weight_bytes,
)
from cluster.planning.shapes import (
    LINEAR_NAMES,
    QWEN25_SHAPES,
    ModelShape,
    ModelShapeError,
    builtin_shape,
)
from cluster.planning.verdict import MemoryPlan, advice, phase_bytes, plan_memory, vllm_utilization

__all__ = [
    "CUDA_CONTEXT_BYTES",
    "CUDA_GRAPH_BYTES",
    "DTYPE_BYTES",
    "FUSED_LINEARS",
    "LEARNER_SLACK_BYTES",
    "LINEAR_NAMES",
    "LORA_BYTES",
    "NF4_BLOCK",
    "NF4_NESTED_BLOCK",
    "QWEN25_SHAPES",
    "VLLM_PROFILE_DEFAULTS",
    "VLLM_SAMPLER_COPIES",
    "GiB",
    "MemoryInputs",
    "MemoryPlan",
    "MiB",
    "ModelShape",
    "ModelShapeError",
    "activation_bytes",
    "advice",
    "base_layer_bytes",
    "builtin_shape",
    "fused_closure",
    "inputs_from_config",
    "kv_cache_bytes",
    "layer_activation_bytes_per_token",
    "learner_components",
    "learner_resident",
    "logits_bytes",
    "lora_params",
    "nf4_tensor_bytes",
    "nf4_weight_bytes",
    "phase_bytes",
    "plan_memory",
    "rollout_components",
    "vllm_headroom_bytes",
    "vllm_profile_sizes",
    "vllm_utilization",
    "worker_packed_base_bytes",
]
