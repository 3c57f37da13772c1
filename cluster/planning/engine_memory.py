"""Engine memory: one vLLM engine's dense weights, KV cache, profiling headroom and CUDA context."""

from __future__ import annotations

from cluster.planning.inputs import CUDA_CONTEXT_BYTES, GiB, MemoryInputs
from cluster.planning.learner_memory import nf4_tensor_bytes
from cluster.planning.shapes import ModelShape

# vLLM sizes its KV cache as `gpu_memory_utilization * device - weights - profiled peak`; the profile
# run is a forward over `max_num_batched_tokens` tokens plus a dummy sampler step over
# `max_num_seqs` rows. This project leaves both unset, so vLLM 0.32's defaults for the offline `LLM`
# class apply (vllm/engine/arg_utils.py): 8192 tokens / 256 seqs under 70 GiB of device memory,
# 16384 / 1024 above (H100, H200; A100-80GB keeps the small ones, not modelled).
VLLM_PROFILE_DEFAULTS = ((70 * GiB, 16384, 1024), (0, 8192, 256))  # (min device bytes, tokens, seqs)
# The sampler step holds fp32 logits, probs and logprobs for each row: 3 x 4 bytes per vocab entry.
VLLM_SAMPLER_COPIES = 3
# CUDA-graph memory pool when `enforce_eager` is off: vLLM logs 0.3-1 GiB for 0.5B-8B models.
CUDA_GRAPH_BYTES = 1 * GiB


def kv_cache_bytes(shape: ModelShape, dtype_bytes: int, sequences: int, tokens_per_sequence: int) -> int:
    """2 (K, V) * layers * kv_heads * head_dim * bytes * sequences * tokens.

    Every concurrent sequence at full length: an upper bound, as prefix caching shares a group's
    prompt blocks, and vLLM queues (does not fail) when fewer blocks are free.
    """
    per_token = 2 * shape.num_hidden_layers * shape.kv_dim * dtype_bytes
    return per_token * sequences * tokens_per_sequence


def vllm_profile_sizes(device_bytes: int) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) vLLM defaults to on a device of this size."""
    return next((tokens, seqs) for floor, tokens, seqs in VLLM_PROFILE_DEFAULTS if device_bytes >= floor)


def vllm_headroom_bytes(shape: ModelShape, dtype_bytes: int, enforce_eager: bool, device_bytes: int) -> int:
    """What vLLM's profile run charges inside its budget besides weights and KV cache.

    = tokens * bytes * (2h + 3i)   forward peak at the MLP over max_num_batched_tokens: hidden +
                                   residual, fused gate_up output (2i) and its SiLU-and-mul (i)
    + seqs * V * 4 * 3             dummy sampler step over max_num_seqs rows: fp32 logits, probs, logprobs
    + CUDA_GRAPH_BYTES unless enforce_eager
    """
    tokens, seqs = vllm_profile_sizes(device_bytes)
    forward = tokens * dtype_bytes * (2 * shape.hidden_size + 3 * shape.intermediate_size)
    sampler = seqs * shape.vocab_size * 4 * VLLM_SAMPLER_COPIES
    return forward + sampler + (0 if enforce_eager else CUDA_GRAPH_BYTES)


FUSED_LINEARS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # vLLM's qkv_proj, gate_up_proj


def base_layer_bytes(
    shape: ModelShape, names: set[str], quantization: str, double_quant: bool, c: int
) -> int:
    """The base of these decoder linears, in every layer, as the learner stores it (c: its dtype):

    = layers * sum over them of nf4_tensor_bytes(in * out)   (NF4; dense: in*out*c)
    + layers * (q_dim + 2*kv_dim) * c   the q/k/v biases, when q_proj is among them
    """
    shapes = shape.linear_shapes()
    if quantization == "nf4":
        per_layer = sum(nf4_tensor_bytes(a * b, double_quant) for n, (a, b) in shapes.items() if n in names)
    else:
        per_layer = sum(a * b * c for n, (a, b) in shapes.items() if n in names)
    if shape.qkv_bias and "q_proj" in names:
        per_layer += (shape.q_dim + 2 * shape.kv_dim) * c
    return shape.num_hidden_layers * per_layer


def fused_closure(targets: list[str]) -> set[str]:
    """The adapted linears plus their vLLM fusion siblings (q_proj -> q, k, v; gate -> gate, up)."""
    names = set(targets)
    for group in FUSED_LINEARS:
        if names & set(group):
            names |= set(group)
    return names


def worker_packed_base_bytes(inputs: MemoryInputs) -> int:
    """sync: worker_merge keeps, next to its engine, the base of every layer it rebuilds each sync
    (the adapted linears closed under vLLM's fusion): base_layer_bytes of those. 0 unless the base
    is kept on the engine's device (`worker_base_on_device`)."""
    if not inputs.worker_base_on_device:
        return 0
    names = fused_closure(inputs.lora_targets)
    return base_layer_bytes(
        inputs.shape, names, inputs.quantization, inputs.double_quant, inputs.compute_bytes
    )


def rollout_components(inputs: MemoryInputs) -> dict[str, int]:
    """Bytes per engine component: the engine runs merged dense weights, so all params count."""
    shape, r = inputs.shape, inputs.rollout_bytes
    return {
        "weights": shape.total_params() * r,
        "packed_base": worker_packed_base_bytes(inputs),  # outside vLLM's fraction, like the context
        "kv_cache": kv_cache_bytes(shape, r, inputs.rollout_sequences, inputs.sequence_tokens),
        "headroom": vllm_headroom_bytes(shape, r, inputs.enforce_eager, inputs.device_bytes),
        "context": CUDA_CONTEXT_BYTES,  # outside gpu_memory_utilization: vLLM measures after creating it
    }
