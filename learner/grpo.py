"""GRPO math as pure torch functions: tensors in, tensors (and python-float metrics) out.

No Ray, vLLM, I/O or model code lives here. Shape suffixes: ``_P`` prompts, ``_G`` group members,
``_B`` sequences in a (micro)batch, ``_T`` completion tokens, ``_V`` vocabulary.

Masking convention: every ``mask_B_T`` may be bool or float (non-zero = counts). Values at masked-out
positions are never trusted: they are replaced by 0 *before* any arithmetic, so NaN/inf padding
cannot leak into the loss or (through ``torch.where``'s backward) into gradients.

Micro-batching: ``loss_normaliser`` is computed once over the WHOLE batch and passed to every
``grpo_loss`` call; each call returns ``sum_of_its_per_sequence_contributions / normaliser``, so summing
the micro-batch losses (or accumulating their gradients) gives exactly the whole-batch loss (gradient).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import get_args

import torch
from torch import Tensor

from learner.config import Aggregation, LossConfig

__all__ = [
    "combine_metrics",
    "entropy_from_logits",
    "group_advantages",
    "grpo_loss",
    "k3_kl",
    "loss_normaliser",
    "masked_mean",
    "truncated_importance_weights",
]

_AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)  # declared once, in learner/config.py

# Metric keys that are additive across micro-batches (see ``combine_metrics``).
_SUM_KEYS = frozenset({"loss", "num_tokens", "num_seqs", "tis/nonfinite_sampler"})


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _as_bool_mask(mask: Tensor) -> Tensor:
    """Bool view of a 0/1 (bool, int or float) mask: ``mask != 0``."""
    return mask if mask.dtype == torch.bool else mask != 0


def _check_same_shape(ref_name: str, ref: Tensor, **others: Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.shape != ref.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)} like {ref_name}"
            )


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is set; 0 when nothing is masked in.

    ``masked_mean = sum(x * m) / max(sum(m), 1)`` with ``m = (mask != 0)``. Masked-out values of ``x``
    are ignored even if NaN/inf (selected away with ``torch.where``, not multiplied). Returns a 0-dim
    tensor in ``x``'s dtype; differentiable w.r.t. ``x``.
    """
    m = _as_bool_mask(mask)
    if m.shape != x.shape:
        m = m.expand_as(x)
    total = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum()
    count = m.sum().clamp(min=1).to(x.dtype)
    return total / count


def entropy_from_logits(logits_B_T_V: Tensor) -> Tensor:
    """Per-token entropy of the softmax distribution over the last dimension.

    ``H = -sum_v p_v log p_v`` with ``log p = log_softmax(logits)`` (stable for large logits).
    Computed in at least float32 (bf16/fp16 logits are upcast; beware memory for large vocabularies,
    chunk over B/T in the caller). Entries with ``p_v = 0`` (``-inf`` logits) contribute exactly 0 and
    give finite gradients. Returns shape ``logits_B_T_V.shape[:-1]`` (e.g. ``_B_T``).
    """
    logits = logits_B_T_V
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    # p * logp is 0 * -inf = NaN where p == 0; substitute a finite logp there (p is 0, so the product
    # is 0) to keep both the value and the backward (grad_p = -logp) finite.
    finite_logp = torch.where(
        torch.isfinite(logp), logp, torch.zeros((), dtype=logp.dtype, device=logp.device)
    )
    return -(p * finite_logp).sum(dim=-1)


# --------------------------------------------------------------------------------------------------
# advantages
# --------------------------------------------------------------------------------------------------


def group_advantages(
    rewards_P_G: Tensor, valid_P_G: Tensor, scale_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """Group-relative advantages, one per (prompt, member).

    GRPO (``scale_by_std=True``):   ``A_pg = (r_pg - mean_p) / (std_p + eps)``
    Dr. GRPO (``scale_by_std=False``): ``A_pg = r_pg - mean_p``

    where, over the ``n_p`` VALID members of group p (``valid_P_G`` true AND reward finite)::

        mean_p = sum_valid r / n_p
        std_p  = sqrt( sum_valid (r - mean_p)^2 / (n_p - 1) )      # sample (unbiased, Bessel) std

    The std is the *sample* std, matching TRL's ``GRPOTrainer`` and verl (both call
    ``torch.std``, whose default is ``correction=1``); DeepSeekMath does not specify.

    Special cases (all give exactly 0, never NaN):
      * invalid members (``valid=False`` or a non-finite reward — NaN/inf are treated as invalid even
        when flagged valid) get 0 and do not enter mean/std;
      * groups with fewer than 2 valid members get 0 everywhere;
      * zero-spread groups (all valid rewards equal, detected exactly as ``max == min``) get 0 even
        though floating-point ``r - mean`` could be a few ulps off.

    Statistics are computed in float64 and the result is cast back to the reward dtype
    (float32 for integer/bool rewards). Returns shape ``_P_G``.
    """
    if rewards_P_G.dim() != 2:
        raise ValueError(f"rewards_P_G must be 2-D (prompts, group), got shape {tuple(rewards_P_G.shape)}")
    _check_same_shape("rewards_P_G", rewards_P_G, valid_P_G=valid_P_G)
    out_dtype = rewards_P_G.dtype if rewards_P_G.is_floating_point() else torch.float32

    r = rewards_P_G.to(torch.float64)
    valid = _as_bool_mask(valid_P_G) & torch.isfinite(r)
    zero = torch.zeros((), dtype=torch.float64, device=r.device)
    r = torch.where(valid, r, zero)

    n_P = valid.sum(dim=-1, keepdim=True)
    mean_P = r.sum(dim=-1, keepdim=True) / n_P.clamp(min=1)
    centred = torch.where(valid, r - mean_P, zero)

    inf = torch.tensor(math.inf, dtype=torch.float64, device=r.device)
    r_max = torch.where(valid, r, -inf).amax(dim=-1, keepdim=True)
    r_min = torch.where(valid, r, inf).amin(dim=-1, keepdim=True)
    usable_P = (n_P >= 2) & (r_max > r_min)

    if scale_by_std:
        var_P = (centred * centred).sum(dim=-1, keepdim=True) / (n_P - 1).clamp(min=1)
        adv = centred / (var_P.sqrt() + eps)
    else:
        adv = centred
    adv = torch.where(valid & usable_P, adv, zero)
    return adv.to(out_dtype)


# --------------------------------------------------------------------------------------------------
# KL and importance weights
# --------------------------------------------------------------------------------------------------


def k3_kl(logprobs_B_T: Tensor, ref_logprobs_B_T: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) (Schulman's "approximating KL").

    ``k3 = exp(ref - logp) - (ref - logp) - 1 >= 0``, computed as ``expm1(d) - d`` with
    ``d = ref - logp`` for accuracy near 0 (and clamped at 0 against rounding). Unbiased for
    KL(pi || pi_ref) when tokens are sampled from pi. Differentiable w.r.t. both inputs; no masking
    (mask in the caller). Returns shape ``_B_T``.
    """
    _check_same_shape("logprobs_B_T", logprobs_B_T, ref_logprobs_B_T=ref_logprobs_B_T)
    d = ref_logprobs_B_T - logprobs_B_T
    return (torch.expm1(d) - d).clamp(min=0.0)


def truncated_importance_weights(
    learner_logprobs_B_T: Tensor, sampler_logprobs_B_T: Tensor, mask_B_T: Tensor, cap: float
) -> tuple[Tensor, dict[str, float]]:
    """Truncated importance sampling (TIS) weights for the sampler (vLLM) / learner mismatch.

    ``rho = exp(learner_old - sampler)``, ``w = min(rho, cap)``; ``w`` is detached (no gradient).
    Masked-out positions get ``w = 0`` (their inputs are never read, so NaN padding is harmless).

    Stats (python floats), over masked-in tokens and on the RAW ratio ``rho`` before truncation:
    ``ratio_mean``, ``ratio_min``, ``ratio_max``, ``trunc_frac`` (fraction with ``rho > cap``), and
    ``num_tokens``, ``nonfinite_sampler`` (masked-in tokens whose sampler logprob is NaN/inf: they get
    ``rho = 1``). With no masked-in token every stat is 0.0. ``cap = math.inf`` gives plain
    monitoring (no truncation).
    """
    if not cap > 0:
        raise ValueError(f"TIS cap must be > 0, got {cap}")
    _check_same_shape(
        "learner_logprobs_B_T",
        learner_logprobs_B_T,
        sampler_logprobs_B_T=sampler_logprobs_B_T,
        mask_B_T=mask_B_T,
    )
    with torch.no_grad():
        m = _as_bool_mask(mask_B_T)
        zero = torch.zeros((), dtype=learner_logprobs_B_T.dtype, device=learner_logprobs_B_T.device)
        # A non-finite sampler logprob on a real token (an engine glitch) says nothing about the
        # mismatch: that token gets ratio 1, like padding gets weight 0, and is counted.
        bad_sampler = m & ~torch.isfinite(sampler_logprobs_B_T.detach())
        log_rho = torch.where(
            m & ~bad_sampler, learner_logprobs_B_T.detach() - sampler_logprobs_B_T.detach(), zero
        )
        rho = log_rho.exp()
        weights = torch.where(m, rho.clamp(max=cap), zero)

        n = int(m.sum().item())
        if n == 0:
            stats = {"ratio_mean": 0.0, "ratio_min": 0.0, "ratio_max": 0.0, "trunc_frac": 0.0}
        else:
            rho_in = rho[m]
            stats = {
                "ratio_mean": float(rho_in.double().mean().item()),
                "ratio_min": float(rho_in.min().item()),
                "ratio_max": float(rho_in.max().item()),
                "trunc_frac": float((rho_in > cap).double().mean().item()),
            }
        stats["num_tokens"] = float(n)
        stats["nonfinite_sampler"] = float(bad_sampler.sum().item())
    return weights, stats


# --------------------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------------------


def loss_normaliser(mask_B_T: Tensor, aggregation: str, max_new_tokens: int) -> float:
    """Denominator of the loss for the WHOLE batch (compute once, pass to every micro-batch call).

    * ``token_mean``: ``N = sum_{b,t} m_bt`` (masked-in tokens);
    * ``seq_mean``:   ``N = #{b : sum_t m_bt > 0}`` (sequences with at least one token);
    * ``constant`` (Dr. GRPO): ``N = B * max_new_tokens`` with ``B = mask_B_T.shape[0]`` counting ALL
      rows, masked or not, so the denominator does not depend on lengths or on which rewards failed.

    Always ``>= 1`` (clamped), so an all-masked batch gives loss 0, never NaN.
    """
    if aggregation not in _AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {_AGGREGATIONS}, got {aggregation!r}")
    if mask_B_T.dim() != 2:
        raise ValueError(f"mask_B_T must be 2-D, got shape {tuple(mask_B_T.shape)}")
    m = _as_bool_mask(mask_B_T)
    if aggregation == "token_mean":
        n = int(m.sum().item())
    elif aggregation == "seq_mean":
        n = int(m.any(dim=-1).sum().item())
    else:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        n = int(m.shape[0]) * int(max_new_tokens)
    return float(max(n, 1))


def grpo_loss(
    logprobs_B_T: Tensor,
    old_logprobs_B_T: Tensor,
    advantages_B: Tensor,
    mask_B_T: Tensor,
    settings: LossConfig,
    normaliser: float,
    ref_logprobs_B_T: Tensor | None = None,
    sampler_logprobs_B_T: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped GRPO surrogate (+ optional k3 KL and TIS) for one (micro)batch.

    Per masked-in token (b, t), with ``A = advantages_B[b]``::

        ratio = exp(logp - old)
        surr  = min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)
        l_bt  = -w_bt * surr + beta * k3(logp, ref)
        w_bt  = min(exp(old - sampler), tis_cap)   (detached; 1 when tis_cap is None)

    Aggregation (``N = normaliser``, the whole-batch value from ``loss_normaliser``)::

        token_mean: loss = sum_{b,t} m_bt l_bt / N
        seq_mean:   loss = sum_b [ sum_t m_bt l_bt / max(sum_t m_bt, 1) ] / N   (empty rows add 0)
        constant:   loss = sum_{b,t} m_bt l_bt / N

    Every term is a per-sequence contribution over the same ``N``, so summing this loss (or its
    gradients) over micro-batches that partition the batch reproduces the full-batch value exactly.

    Errors: ``beta > 0`` needs ``ref_logprobs_B_T``; ``tis_cap`` set needs ``sampler_logprobs_B_T``.
    If sampler logprobs are given while ``tis_cap is None``, the ``tis/`` stats are still reported
    (monitoring only, cap = inf) but no weights are applied.

    Metrics (python floats). THIS micro-batch only:
      * additive: ``loss`` (this call's contribution; sum over micro-batches = full loss),
        ``num_tokens`` (masked-in tokens), ``num_seqs`` (sequences with >= 1 token);
      * token-weighted means over masked-in tokens (0.0 when ``num_tokens == 0``): ``clip_frac``,
        ``clip_frac_low`` (A < 0 and ratio < 1 - clip_low), ``clip_frac_high`` (A > 0 and
        ratio > 1 + clip_high), ``ratio_mean``, ``kl_mean`` (when ref is given), ``tis/ratio_mean``,
        ``tis/trunc_frac``, ``tis/weight_mean``; summed: ``tis/nonfinite_sampler`` (tokens given ratio 1);
      * extrema: ``tis/ratio_min``, ``tis/ratio_max``.
    Use ``combine_metrics`` to merge micro-batch dicts (sums, ``num_tokens``-weighted means, min/max).
    """
    if logprobs_B_T.dim() != 2:
        raise ValueError(f"logprobs_B_T must be 2-D, got shape {tuple(logprobs_B_T.shape)}")
    _check_same_shape(
        "logprobs_B_T",
        logprobs_B_T,
        old_logprobs_B_T=old_logprobs_B_T,
        mask_B_T=mask_B_T,
        ref_logprobs_B_T=ref_logprobs_B_T,
        sampler_logprobs_B_T=sampler_logprobs_B_T,
    )
    if advantages_B.shape != logprobs_B_T.shape[:1]:
        raise ValueError(
            f"advantages_B has shape {tuple(advantages_B.shape)}, expected ({logprobs_B_T.shape[0]},)"
        )
    if not normaliser > 0:
        raise ValueError(f"normaliser must be > 0, got {normaliser}")
    if settings.beta > 0 and ref_logprobs_B_T is None:
        raise ValueError("beta > 0 requires ref_logprobs_B_T")
    if settings.tis_cap is not None and sampler_logprobs_B_T is None:
        raise ValueError("tis_cap is set but sampler_logprobs_B_T is None")

    dtype, device = logprobs_B_T.dtype, logprobs_B_T.device
    m = _as_bool_mask(mask_B_T)
    zero = torch.zeros((), dtype=dtype, device=device)

    # Sanitise every input at masked-out positions BEFORE any arithmetic (NaN-safe forward and backward).
    logp = torch.where(m, logprobs_B_T, zero)
    old = torch.where(m, old_logprobs_B_T.detach().to(dtype), zero)
    adv = torch.where(m, advantages_B.detach().to(dtype)[:, None], zero)

    ratio = torch.exp(logp - old)
    clipped_ratio = ratio.clamp(1.0 - settings.clip_low, 1.0 + settings.clip_high)
    surrogate = torch.minimum(ratio * adv, clipped_ratio * adv)

    tis_stats: dict[str, float] | None = None
    weights: Tensor | None = None
    if sampler_logprobs_B_T is not None:
        cap = settings.tis_cap if settings.tis_cap is not None else math.inf
        w, tis_stats = truncated_importance_weights(old, sampler_logprobs_B_T.to(dtype), m, cap)
        if settings.tis_cap is not None:
            weights = w
    per_token = -(weights * surrogate) if weights is not None else -surrogate

    kl: Tensor | None = None
    if ref_logprobs_B_T is not None:
        ref = torch.where(m, ref_logprobs_B_T.detach().to(dtype), zero)
        kl = k3_kl(logp, ref)
        if settings.beta > 0:
            per_token = per_token + settings.beta * kl

    per_token = torch.where(m, per_token, zero)
    tokens_B = m.sum(dim=-1)
    if settings.aggregation == "seq_mean":
        per_seq = per_token.sum(dim=-1) / tokens_B.clamp(min=1).to(dtype)
        loss = per_seq.sum() / normaliser
    else:  # token_mean and constant differ only in the whole-batch normaliser
        loss = per_token.sum() / normaliser

    with torch.no_grad():
        n_tok = int(tokens_B.sum().item())
        denom = float(max(n_tok, 1))
        clip_low = m & (adv < 0) & (ratio < 1.0 - settings.clip_low)
        clip_high = m & (adv > 0) & (ratio > 1.0 + settings.clip_high)
        metrics: dict[str, float] = {
            "loss": float(loss.detach().item()),
            "num_tokens": float(n_tok),
            "num_seqs": float(int((tokens_B > 0).sum().item())),
            "clip_frac_low": float(clip_low.sum().item()) / denom,
            "clip_frac_high": float(clip_high.sum().item()) / denom,
            "ratio_mean": float(torch.where(m, ratio, zero).double().sum().item()) / denom,
        }
        metrics["clip_frac"] = metrics["clip_frac_low"] + metrics["clip_frac_high"]
        if kl is not None:
            metrics["kl_mean"] = float(torch.where(m, kl, zero).double().sum().item()) / denom
        if tis_stats is not None:
            for key in ("ratio_mean", "ratio_min", "ratio_max", "trunc_frac", "nonfinite_sampler"):
                metrics[f"tis/{key}"] = tis_stats[key]
            w_used = weights if weights is not None else torch.where(m, torch.ones_like(ratio), zero)
            metrics["tis/weight_mean"] = float(w_used.double().sum().item()) / denom
    return loss, metrics


def combine_metrics(parts: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Merge the metric dicts of several ``grpo_loss`` micro-batch calls into whole-batch metrics.

    ``loss``, ``num_tokens``, ``num_seqs`` are summed; keys ending in ``_min`` / ``_max`` take the
    min / max over parts with ``num_tokens > 0``; every other key is the ``num_tokens``-weighted mean
    (so it equals the value a single whole-batch call would report). Keys missing from a part are
    skipped for that part. Empty input gives ``{}``.
    """
    out: dict[str, float] = {}
    keys: list[str] = []
    for part in parts:
        keys.extend(k for k in part if k not in keys)
    for key in keys:
        present = [p for p in parts if key in p]
        if key in _SUM_KEYS:
            out[key] = float(sum(p[key] for p in present))
            continue
        nonempty = [p for p in present if p.get("num_tokens", 1.0) > 0]
        if key.endswith("_min"):
            out[key] = float(min(p[key] for p in nonempty)) if nonempty else 0.0
        elif key.endswith("_max"):
            out[key] = float(max(p[key] for p in nonempty)) if nonempty else 0.0
        else:
            total_w = sum(p.get("num_tokens", 1.0) for p in present)
            out[key] = (
                float(sum(p[key] * p.get("num_tokens", 1.0) for p in present) / total_w)
                if total_w > 0
                else 0.0
            )
    return out
