"""Token log-probabilities from final hidden states, a chunk of tokens at a time: no [tokens x vocab].

For N scored tokens with hidden states h_N_H, an output layer z = h W^T (+ b) over V entries and a
sampling temperature tau, each token t needs

    logp_t = log_softmax(z_t / tau)[y_t]          H_t = -sum_v p_tv log p_tv   (p_t = softmax(z_t / tau))

With V = 152k, z in float32 is 600 KB per token, so a micro-batch of 8 x 512 completion tokens holds
2.3 GiB of logits, plus the same again for the saved log-softmax. Here the tokens are taken C at a
time: logits -> log-softmax -> gather -> entropy, and only [C, V] temporaries ever exist.

The backward needs nothing of the chunk afterwards. logp_t depends on h_t alone, and for a frozen
output layer its gradient is one H-vector per token, known in the forward:

    d logp_t / d h_t = J_t = (onehot(y_t) - p_t) W / tau

so the forward stores J_N_H (the size of the hidden states) and the backward is grad_h_t = g_t J_t.
That is the same matmul the unchunked backward does ((g (onehot - p) / tau) W), moved forward: no
logits are recomputed, so the chunked step costs the same FLOPs as the unchunked one. (Liger's fused
linear cross entropy does the same for a scalar loss; a per-token output just keeps J per token.)
The output layer's weight gets no gradient: LoRA adapts the decoder, never the output layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def chunked_token_logprobs(
    hidden_N_H: torch.Tensor,
    output_layer: torch.nn.Linear,
    targets_N: torch.Tensor,
    temperature: float,
    chunk_tokens: int,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logprobs_N, entropy_N or None), float32 (float64 for float64 input), of `targets_N` under softmax(output_layer(h) / tau).

    hidden_N_H: final (post-norm) hidden states of the N scored positions, any float dtype; the
    logits are computed in that dtype and upcast to float32, as the unchunked path does.
    chunk_tokens: tokens per chunk (>= 1); peak extra memory is about 8 * chunk_tokens * V bytes.
    Differentiable w.r.t. hidden_N_H (first-order); the entropy is a metric and carries no gradient.
    Raises ValueError when the output layer has a trainable parameter (its gradient is not formed).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if any(p.requires_grad for p in output_layer.parameters()):
        raise ValueError(
            "chunked log-probabilities treat the output layer (lm_head) as frozen, but it has a "
            "trainable parameter: remove lm_head from learner.lora.target_modules"
        )
    logprobs_N, entropy_N = _ChunkedLogprobs.apply(
        hidden_N_H,
        output_layer.weight,
        output_layer.bias,
        targets_N,
        float(temperature),
        chunk_tokens,
        with_entropy,
    )
    return logprobs_N, entropy_N if with_entropy else None


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden_N_H: torch.Tensor,
        weight_V_H: torch.Tensor,
        bias_V: torch.Tensor | None,
        targets_N: torch.Tensor,
        temperature: float,
        chunk_tokens: int,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        need_grad = bool(ctx.needs_input_grad[0])
        n = hidden_N_H.shape[0]
        device = hidden_N_H.device
        dtype = torch.promote_types(hidden_N_H.dtype, torch.float32)  # float32, or float64 for float64
        logprobs_N = torch.empty(n, dtype=dtype, device=device)
        entropy_N = torch.empty(n if with_entropy else 0, dtype=dtype, device=device)
        jacobian_N_H = torch.empty_like(hidden_N_H) if need_grad else None
        for start in range(0, n, chunk_tokens):
            rows = slice(start, min(n, start + chunk_tokens))
            targets_C1 = targets_N[rows, None]
            # The unchunked path's arithmetic, per chunk: logits in the compute dtype, upcast, / tau.
            logits_C_V = F.linear(hidden_N_H[rows], weight_V_H, bias_V).to(dtype)
            if temperature != 1.0:
                logits_C_V.div_(temperature)
            logp_C_V = torch.log_softmax(logits_C_V, dim=-1)
            del logits_C_V
            logprobs_N[rows] = logp_C_V.gather(1, targets_C1).squeeze(1)
            if not (with_entropy or need_grad):
                continue
            p_C_V = logp_C_V.exp()
            if with_entropy:
                # -sum_v p log p as a batched dot product: no [C, V] product tensor. Finite logits
                # give finite log p, so p = 0 entries add exactly 0.
                entropy_N[rows] = -torch.bmm(p_C_V[:, None, :], logp_C_V[:, :, None]).view(-1)
            del logp_C_V
            if need_grad:
                assert jacobian_N_H is not None
                grad_C_V = p_C_V.neg_()  # in place: d logp_y / d logits = onehot(y) - p
                grad_C_V.scatter_add_(1, targets_C1, torch.ones_like(targets_C1, dtype=grad_C_V.dtype))
                if temperature != 1.0:
                    grad_C_V.div_(temperature)
                # Cast to the compute dtype before the matmul, as autograd casts the logits' gradient.
                jacobian_N_H[rows] = grad_C_V.to(weight_V_H.dtype) @ weight_V_H
            del p_C_V
        ctx.mark_non_differentiable(entropy_N)
        if jacobian_N_H is not None:
            ctx.save_for_backward(jacobian_N_H)
        return logprobs_N, entropy_N

    @staticmethod
    def backward(ctx: Any, grad_logprobs_N: torch.Tensor, _grad_entropy: torch.Tensor) -> tuple[Any, ...]:
        (jacobian_N_H,) = ctx.saved_tensors
        grad_hidden_N_H = (grad_logprobs_N[:, None] * jacobian_N_H).to(jacobian_N_H.dtype)
        return grad_hidden_N_H, None, None, None, None, None, None
