"""How far from the limit: each phase's useful FLOPs against this machine's measured float32 GEMM rate.

Nearly all of a step is matrix multiplication, so the limit is the rate at which this machine
multiplies float32 matrices. A child process measures it with `torch.mm` on the benchmark model's
own layer shapes (a learner micro-batch of tokens through a projection, both directions of the MLP),
on every core, and keeps the best shape's median rate.

Useful FLOPs are what the step's work requires at the least, whatever the implementation:
- generate: one forward over each distinct prompt and one per sampled token but the last (prefill
  shared by the group, as vLLM's prefix cache allows);
- train: the same tokens forward, then backward through the frozen layers (their input gradients:
  as many FLOPs as the forward) and through the adapter (input and weight gradients: twice its
  forward), attention scores backward twice their forward.
A forward token costs 2 FLOPs per linear weight it meets (projections, MLP, LM head, LoRA factors)
plus 4 * context * heads * head_dim per layer for attention scores and values.

The ratios then say how much of the step is spent at the machine's matmul rate, and the lower bound
(useful FLOPs / GEMM rate) says how short any implementation could make this step on this machine.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.common import WORKLOAD, Settings, child_main, run_child, train_prompts

GEMM_REPEATS = 7


def run(settings: Settings, e2e_section: dict[str, Any] | None) -> dict[str, Any]:
    spec = {"kind": "gemm", "model": str(settings.model), "cores": settings.cores, "threads": settings.cores}
    measured = run_child("limits", spec, settings, "limits-gemm")
    section: dict[str, Any] = {**measured, "variants": {}}
    if not e2e_section:
        section["skipped"] = "no e2e section to compare with (run it first or in the same invocation)"
        return section
    for quantization, variant in e2e_section["variants"].items():
        section["variants"][quantization] = _phases(measured, variant)
    return section


def _phases(measured: dict[str, Any], variant: dict[str, Any]) -> dict[str, Any]:
    ours = variant["grpo-ray"]
    split = {part: s["median"] for part, s in ours["breakdown_s"].items()}
    completion = statistics.median(r["completion_tokens_per_step"] for r in variant["runs"]["grpo-ray"])
    flops = useful_flops(measured["shape"], measured["prompt_lens"], completion / WORKLOAD.sequences)
    rate = measured["gemm_flops_per_s"]
    out: dict[str, Any] = {"useful_flops": flops, "phases": {}}
    for part, key in (("generate", "generate"), ("train", "learner_compute")):
        seconds = split[key]
        out["phases"][part] = {
            "seconds": seconds,
            "flops_per_s": flops[part] / seconds,
            "of_gemm_rate": flops[part] / seconds / rate,
        }
    step = ours["s_per_step"]["median"]
    bound = (flops["generate"] + flops["train"]) / rate
    out["step_s"] = step
    out["step_lower_bound_s"] = bound
    out["step_of_bound"] = bound / step
    if "trl" in variant and "s_per_step" in variant["trl"]:
        out["trl_step_s"] = variant["trl"]["s_per_step"]["median"]
        out["best_possible_ratio_vs_trl"] = out["trl_step_s"] / bound
    return out


def useful_flops(shape: dict[str, int], prompt_lens: list[int], completion_len: float) -> dict[str, float]:
    """Generate and train FLOPs of one step of the workload (see the module docstring)."""
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    heads, kv_heads, head_dim, vocab = (
        shape["num_attention_heads"],
        shape["num_key_value_heads"],
        shape["head_dim"],
        shape["vocab_size"],
    )
    q, kv = heads * head_dim, kv_heads * head_dim
    linear = layers * (h * q + 2 * h * kv + q * h + 3 * h * inter) + vocab * h
    r = WORKLOAD.lora_rank
    lora = layers * r * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + inter) + (inter + h))
    g = WORKLOAD.group_size

    def forward(tokens: float, mean_context: float) -> tuple[float, float, float]:
        return 2 * linear * tokens, 2 * lora * tokens, 4 * layers * q * mean_context * tokens

    prompt_tokens = float(sum(prompt_lens))
    mean_prompt = prompt_tokens / len(prompt_lens)
    # The last sampled token is never fed back: the prompt forward yields token 0, token t's forward
    # yields token t + 1.
    completion_tokens = max(0.0, completion_len - 1) * g * len(prompt_lens)
    parts = [
        forward(prompt_tokens, mean_prompt / 2),
        forward(completion_tokens, mean_prompt + completion_len / 2),
    ]
    fwd_linear, fwd_lora, fwd_attention = (sum(p[i] for p in parts) for i in range(3))
    generate = fwd_linear + fwd_lora + fwd_attention
    train = 2 * fwd_linear + 3 * fwd_lora + 3 * fwd_attention
    return {"generate": generate, "train": train}


# ---- the GEMM measurement (a child process) -------------------------------------------------------


def gemm_child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["cores"])
    shape = json.loads((Path(spec["model"]) / "config.json").read_text())
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    tokens = WORKLOAD.micro_batch_size * (WORKLOAD.max_new_tokens - 1)  # one completion forward's rows
    shapes = [(tokens, h, inter), (tokens, inter, h), (tokens, h, h)]
    rates: dict[str, float] = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(2):
            torch.mm(a, b)
        seconds = []
        for _ in range(GEMM_REPEATS):
            begin = time.perf_counter()
            torch.mm(a, b)
            seconds.append(time.perf_counter() - begin)
        rates[f"{m}x{k}x{n}"] = 2 * m * k * n / statistics.median(seconds)
    prompts = train_prompts(spec["model"], WORKLOAD.prompts_per_step)
    return {
        "gemm_rates": rates,
        "gemm_flops_per_s": max(rates.values()),
        "threads": spec["cores"],
        "shape": {k: shape[k] for k in _SHAPE_KEYS},
        "prompt_lens": [len(p.token_ids) for p in prompts],
    }


_SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)


def markdown(section: dict[str, Any]) -> list[str]:
    rate = section["gemm_flops_per_s"]
    lines = [
        "## 6. How far from the limit (useful FLOPs vs this machine's float32 GEMM rate)",
        "",
        f"GEMM rate: {rate / 1e9:.0f} GFLOP/s (`torch.mm` on the model's layer shapes, {section['threads']} "
        "threads, best shape). Useful FLOPs: the least the step's work needs (each prompt once per group, "
        "each sampled token once; backward = input gradients of the frozen layers + the adapter's "
        "gradients); see benchmarks/limits.py.",
        "",
    ]
    if section.get("skipped"):
        return [*lines, f"Phases: {section['skipped']}."]
    lines += [
        "| base | phase | useful GFLOP | seconds | GFLOP/s | of GEMM rate |",
        "|---|---|---|---|---|---|",
    ]
    for quantization, v in section["variants"].items():
        for part, p in v["phases"].items():
            lines.append(
                f"| {quantization} | {part} | {v['useful_flops'][part] / 1e9:.0f} | {p['seconds']:.2f} | "
                f"{p['flops_per_s'] / 1e9:.0f} | {p['of_gemm_rate']:.0%} |"
            )
    lines.append("")
    for quantization, v in section["variants"].items():
        trl = (
            f"; TRL's step ({v['trl_step_s']:.1f} s) over that bound: "
            f"{v['best_possible_ratio_vs_trl']:.2f}x, the most any implementation could reach here"
            if "best_possible_ratio_vs_trl" in v
            else ""
        )
        lines.append(
            f"- {quantization}: step {v['step_s']:.1f} s; every useful FLOP at the GEMM rate would take "
            f"{v['step_lower_bound_s']:.1f} s ({v['step_of_bound']:.0%} of the step){trl}."
        )
    return lines


if __name__ == "__main__":
    child_main({"gemm": gemm_child})
