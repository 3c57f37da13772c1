"""Learner memory: the QLoRA policy's weights, adapter, gradients, AdamW state, activations, logits.

Derived from what this project's code allocates (`learner/model.py`, `learner/logprobs.py`,
`learner/chunked_logprobs.py`); every figure is bytes with its formula in its function's docstring.
"""

from __future__ import annotations

import math

from cluster.planning.inputs import CUDA_CONTEXT_BYTES, MemoryInputs, MiB
from cluster.planning.shapes import ModelShape

# bitsandbytes 4-bit layout (`bnb.functional.quantize_4bit`): two 4-bit codes per byte; one fp32
# absmax per block of 64 weights (0.5 bit/param). With double quantization (`compress_statistics`)
# the absmax are stored as uint8 and quantized blockwise with one fp32 scale per 256 absmax:
# 8/64 + 32/(64*256) = 0.127 bit/param, so 4.127 bits/param in all (4.5 without).
# Per-tensor constants (the 16-entry NF4 code, the 256-entry nested code, one offset) are < 1.2 KiB
# per linear and left out.
NF4_BLOCK = 64
NF4_NESTED_BLOCK = 256

# Learner-side slack for the caching allocator's fragmentation (blocks of freed activations that
# cannot be reused for a differently shaped request) and transient autograd buffers not modelled.
LEARNER_SLACK_BYTES = 512 * MiB


def nf4_tensor_bytes(n: int, double_quant: bool) -> int:
    """One NF4 weight of n params: ceil(n/2) packed bytes + its quantization constants.

    blocks = ceil(n/64); constants = 4*blocks (fp32 absmax), or with double quantization
    blocks (uint8 absmax) + 4*ceil(blocks/256) (fp32 second-level scales).
    """
    blocks = math.ceil(n / NF4_BLOCK)
    constants = blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) if double_quant else 4 * blocks
    return math.ceil(n / 2) + constants


def nf4_weight_bytes(shape: ModelShape, double_quant: bool) -> int:
    """layers * sum over the 7 decoder linears of nf4_tensor_bytes(in * out)."""
    per_layer = sum(nf4_tensor_bytes(a * b, double_quant) for a, b in shape.linear_shapes().values())
    return shape.num_hidden_layers * per_layer


def lora_params(shape: ModelShape, rank: int, targets: list[str]) -> int:
    """layers * sum over adapted linears of r * (in + out)  (A is r x in, B is out x r)."""
    shapes = shape.linear_shapes()
    return shape.num_hidden_layers * sum(rank * sum(shapes[name]) for name in set(targets))


def layer_activation_bytes_per_token(shape: ModelShape, c: int, rank: int, adapted: int) -> int:
    """Bytes one decoder layer keeps for backward, per token (frozen base, trainable LoRA, c-byte dtype).

    = 2 * (4h + 4)     two RMSNorms save their fp32 input and fp32 rsqrt (the frozen weight-multiply
                       saves only the weight)
    + 2 * c*h          the normed inputs, saved once by the LoRA A of q/k/v and of gate/up (the bnb
                       4-bit matmul saves no input: its weight is frozen)
    + 5 * c*q_dim      rotated q; k and v expanded by repeat_kv to q_dim (a padding mask turns off
                       SDPA's native GQA); the SDPA output; the o_proj input (a contiguous copy)
    + 4 * heads        SDPA's fp32 logsumexp; the L x L scores are never stored (flash/mem-efficient)
    + 4 * c*i          gate output (SiLU input), SiLU output, up output, their product (down input)
    + adapted * c*r    each LoRA B's input (A's output); dropout 0 keeps no mask

    Korthikanti et al. 2022 ("Reducing Activation Recomputation") count 34*h*c/2 + 5*heads*L for a
    GPT layer with dropout, a 4h GeLU MLP and stored attention scores; this is the same bookkeeping
    for this model family as it runs here (SwiGLU, GQA, no dropout, fused attention).
    """
    h, q, i = shape.hidden_size, shape.q_dim, shape.intermediate_size
    return (
        2 * (4 * h + 4)
        + 2 * c * h
        + 5 * c * q
        + 4 * shape.num_attention_heads
        + 4 * c * i
        + adapted * c * rank
    )


def activation_bytes(inputs: MemoryInputs) -> int:
    """Saved activations of one micro-batch of B sequences of length L (tokens = B*L).

    no checkpointing: tokens * layers * per_layer
    checkpointing:    tokens * (layers * c*h + per_layer)   (each layer's input is kept; one layer is
                      recomputed at a time in backward)
    + tokens * (4h + 4)  the final RMSNorm (outside the checkpointed layers)
    + the largest decoder linear dequantized to the compute dtype (NF4: bnb materialises each weight
      for its matmul, forward and backward, one at a time)
    """
    shape, c = inputs.shape, inputs.compute_bytes
    tokens = inputs.micro_batch_size * inputs.sequence_tokens
    per_layer = layer_activation_bytes_per_token(shape, c, inputs.lora_rank, len(set(inputs.lora_targets)))
    layers = shape.num_hidden_layers
    stored = (
        layers * c * shape.hidden_size + per_layer if inputs.gradient_checkpointing else layers * per_layer
    )
    final_norm = 4 * shape.hidden_size + 4
    dequantized = (
        max(a * b for a, b in shape.linear_shapes().values()) * c if inputs.quantization == "nf4" else 0
    )
    return tokens * (stored + final_norm) + dequantized


def logits_bytes(inputs: MemoryInputs) -> int:
    """Peak of the log-probability path for one micro-batch (B sequences, T = max_new_tokens scored
    tokens each, N = B*T, V vocabulary entries, h hidden size, c-byte compute dtype).

    Chunked (`learner/chunked_logprobs.py`, C = min(chunk_tokens, N) tokens per chunk):
      8*C*V     one chunk's fp32 logits and their log-softmax (then log p and p; then p becomes the
                gradient in place), alive at once; the compute-dtype matmul output (c*C*V) and the
                cast before the gradient matmul (c*C*V) each live beside only one of them
    + 3*N*h*c   the final hidden states at the scored positions, the masked copy the chunks read, and
                the saved per-token gradient J (d logp_t / d h_t), all [N, h]
    The backward holds only [N, h]-sized tensors (g * J and its scatter back): less than the forward.

    Unchunked (learner.logprob_chunk_tokens 0, the whole [B, T, V] at once): B * V * (c*L + 24*T)
      c*B*L*V   the lm_head output over the whole sequence (alive until the completion slice is taken)
      4*B*T*V   the completion slice upcast to fp32 and divided by the temperature
      4*B*T*V   log_softmax output, saved for backward
      16*B*T*V  the entropy metric (`entropy_from_logits`): log p, p, the masked log p and p * log p,
                all fp32 and alive at once
    """
    b, v, c = inputs.micro_batch_size, inputs.shape.vocab_size, inputs.compute_bytes
    chunk = inputs.chunk_tokens
    if chunk == 0:
        return b * v * (c * inputs.sequence_tokens + 24 * inputs.max_new_tokens)
    tokens = b * inputs.max_new_tokens
    return 8 * min(chunk, tokens) * v + 3 * tokens * inputs.shape.hidden_size * c


LORA_BYTES = 4  # fp32 adapter weights (and so fp32 grads and AdamW moments)


def learner_components(inputs: MemoryInputs) -> dict[str, int]:
    """Bytes per learner component at its training peak (end of a micro-batch's forward)."""
    shape, c = inputs.shape, inputs.compute_bytes
    nf4 = inputs.quantization == "nf4"
    dense_params = shape.dense_params() + (0 if nf4 else shape.decoder_linear_params())
    lora = lora_params(shape, inputs.lora_rank, inputs.lora_targets)
    return {
        "nf4_weights": nf4_weight_bytes(shape, inputs.double_quant) if nf4 else 0,
        "dense_weights": dense_params * c,
        "lora": lora * LORA_BYTES,  # learner/model.py keeps the LoRA params in fp32
        "grads": lora * LORA_BYTES,  # same dtype as the params; kept until the next zero_grad
        "optimizer": 2 * lora * LORA_BYTES,  # torch AdamW: exp_avg, exp_avg_sq = zeros_like(param)
        "activations": activation_bytes(inputs),
        "logits": logits_bytes(inputs),
        "overhead": CUDA_CONTEXT_BYTES + LEARNER_SLACK_BYTES,
    }


_RESIDENT = ("nf4_weights", "dense_weights", "lora", "grads", "optimizer", "overhead")


def learner_resident(learner: dict[str, int]) -> int:
    """What the learner keeps on the device between steps: everything but activations and logits."""
    return sum(learner[k] for k in _RESIDENT)
