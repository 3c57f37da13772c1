"""Float comparisons in the tests go through `within`, so every bound's headroom can be read off a run.

Each numeric bound has its error model in a comment beside it (tests marked `numeric`, see
pyproject.toml). `within(what, measured, allowed)` asserts measured <= allowed and, when
GRPO_NUMERIC_LOG names a file, appends one JSON line per check (test, bound, measured, allowed);
`scripts/numeric_margins.py FILE` prints the largest measured/allowed ratio of each bound, for this
machine and kernel setting.
"""

from __future__ import annotations

import json
import math
import os

import torch

EPS32 = float(torch.finfo(torch.float32).eps)  # 1.19e-7: one float32 rounding is <= EPS32 / 2 relative


def within(what: str, measured: float, allowed: float) -> None:
    note(what, measured, allowed)
    assert measured <= allowed, f"{what}: {measured:.3g} > allowed {allowed:.3g}"


def note(what: str, measured: float, allowed: float) -> None:
    """Record a measured/allowed pair in GRPO_NUMERIC_LOG (if set) without asserting on it."""
    log = os.environ.get("GRPO_NUMERIC_LOG")
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
        row = {"test": test, "bound": what, "measured": measured, "allowed": allowed}
        with open(log, "a") as out:
            out.write(json.dumps(row) + "\n")


def max_gap(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected|, in float64, after checking the shapes agree."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float((actual.double() - expected.double()).abs().max()) if actual.numel() else 0.0


# The shipped tiny Qwen2 (hidden 128, head_dim 64, MLP 384, 3 layers, sequences <= 64 tokens here): the
# float32 sums a logit goes through, per layer: 2 RMSNorms (128 terms each), q/k/v and o projections
# (K=128 each of q/k/v/o), q·k (64), softmax and its weighted sum (64 each), gate/up (128), down (384);
# then the final norm and lm_head (128 each).
TINY_PATH_TERMS = 3 * (2 * 128 + 4 * 128 + 64 + 2 * 64 + 128 + 384) + 2 * 128  # 4,672


def forward_atol(scale: float, terms: int = TINY_PATH_TERMS) -> float:
    """|δ| between two float32 forwards of one model that sum in other orders (other GEMM shapes or
    kernels, another machine, a LoRA product reassociated): rounding errors of the `terms` sums along
    an output's path add like a random walk, sqrt(terms)·EPS32 relative to the outputs' scale, with
    probability > 1 - 1e-3 within 4x that (Higham & Mary 2019's probabilistic bound, lambda = 4)."""
    return 4 * math.sqrt(terms) * EPS32 * scale


def logprob_atol(max_abs_logit: float, temperature: float = 1.0) -> float:
    """logp = z_y/T - logsumexp(z/T): the logit's error plus a softmax-weighted mean of them, so twice
    forward_atol at the logits' scale over T."""
    return 2 * forward_atol(max_abs_logit / temperature)


def assert_greedy_agrees(got: list[int], expected: list[int], margins: list[float], atol: float) -> int:
    """Greedy tokens of two float32 implementations of one model agree, up to the first step where the
    reference's top-2 logit margin is within 2·atol (both logits may be off by atol): there either
    token is a right argmax and the continuations may part. `margins[t]` is the reference's margin at
    step t. Returns how many tokens were compared."""
    n = min(len(got), len(expected))
    # how near the closest call came to a tie: above 1 the comparison stops early there
    note(
        "greedy: 2·logit error bound / smallest top-2 margin",
        2 * atol / max(min(margins[:n] or [1.0]), 1e-30),
        1.0,
    )
    for t in range(n):
        if margins[t] <= 2 * atol:
            return t  # a near-tie: either choice is the argmax of the exact logits
        assert got[t] == expected[t], (t, got, expected)
    return n


def greedy_reference(
    model: torch.nn.Module, prompt: list[int], max_new_tokens: int
) -> tuple[list[int], list[float], float]:
    """transformers' greedy continuation of `prompt`: (tokens, top-2 logit margin at each step, max |logit|)."""
    out = model.generate(  # type: ignore[operator]
        torch.tensor([prompt]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    top2 = [torch.topk(step[0].float(), 2).values for step in out.logits]
    return tokens, [float(v[0] - v[1]) for v in top2], max(float(s.abs().max()) for s in out.logits)
