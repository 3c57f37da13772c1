"""Chunked log-probabilities: peak memory of one Learner.train_step unchunked vs chunked, and speed.

Memory: the bench model's shape (hidden 512, 8 layers, NF4 + LoRA r=16 all-linear, float32) with
Qwen2.5's real 151,936-entry output layer (scripts/build_bench_model.py --shape bench-vocab152k). One
micro-batch per step (1 prompt x 8 completions, micro-batch 8, prompt sharing on, TIS on), at two
completion lengths. Measured as the RSS high-water mark during one train_step (a thread samples the
process RSS every 0.5 ms) minus the RSS just before it, after one warm-up step, each in a fresh
process. The logits part is that minus the same step on the 320-entry bench model, whose decoder is
identical (so its activations are too): what the output layer's vocabulary adds.

Speed: the bench workload (learner_efficiency's batch: 16 prompts x 8 completions x 64 tokens,
micro-batch 64, 22.9M bench model): Learner.train_step with learner.logprob_chunk_tokens 0 (the path
before chunking) and with the default, in one process, alternated round by round after a warm-up.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from benchmarks.common import (
    ROOT,
    Settings,
    bench_config,
    child_main,
    fmt_range,
    goal_check,
    ratio_summary,
    rotated,
    run_child,
    summary,
    train_prompts,
)

VOCAB_MODEL = ROOT / "benchmarks" / ".model-bench-vocab152k"
SIDES = ("unchunked", "chunked")
LENGTHS = (64, 128)  # completion tokens per sequence: 512 and 1024 scored tokens per micro-batch
MICRO = 8
MEMORY_GOAL = 8.0  # the logits part shrinks at least this much
SPEED_GOAL = 0.95  # chunked tokens/s over unchunked


def run(settings: Settings) -> dict[str, Any]:
    lengths = LENGTHS[:1] if settings.quick else LENGTHS
    memory: dict[str, Any] = {}
    for r, length in enumerate(lengths):
        cells = {}
        for side in rotated([*SIDES, "baseline"], r):
            model = settings.model if side == "baseline" else VOCAB_MODEL
            spec = {
                "kind": "memory",
                "model": str(model),
                "side": "chunked" if side == "baseline" else side,
                "new_tokens": length,
                "cores": settings.cores,
                "threads": settings.cores,
            }
            cells[side] = run_child("chunked_logprobs", spec, settings, f"chunked-memory-{side}-{length}")
        base = cells["baseline"]["peak_delta_bytes"]
        parts = {side: cells[side]["peak_delta_bytes"] - base for side in SIDES}
        memory[str(length)] = {
            "cells": cells,
            "logits_part_bytes": parts,
            "logits_shrink": parts["unchunked"] / max(parts["chunked"], 1),
        }
    spec = {
        "kind": "speed",
        "model": str(settings.model),
        "rounds": 1 if settings.quick else max(settings.timed_steps, settings.repeats),
        "cores": settings.cores,
        "threads": settings.cores,
    }
    speed = run_child("chunked_logprobs", spec, settings, "chunked-speed")
    return {"memory": memory, "speed": speed, "planner": planner_figures()}


def planner_figures() -> dict[str, Any]:
    """The planner's logits line and peaks for the shipped 3B and 7B configs (estimates, no GPU)."""
    from dataclasses import replace

    from cluster.config import load_config
    from cluster.planning.memory import ModelShape, inputs_from_config, plan_memory

    out = {}
    for name in ("gsm8k_qwen2.5-3b_24gb", "gsm8k_qwen2.5-7b_cluster"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        inputs = inputs_from_config(cfg, ModelShape.from_pretrained(cfg.model), cfg.gpu_memory_gib or 24.0)
        rows = {}
        for label, changed in (
            ("as shipped", inputs),
            ("micro-batch 8", replace(inputs, micro_batch_size=8)),
            ("micro-batch 8, unchunked", replace(inputs, micro_batch_size=8, logprob_chunk_tokens=0)),
        ):
            plan = plan_memory(changed)
            rows[label] = {
                "micro_batch_size": changed.micro_batch_size,
                "max_new_tokens": changed.max_new_tokens,
                "chunk_tokens": changed.chunk_tokens,
                "logits_bytes": plan.learner["logits"],
                "learner_bytes": plan.learner_total,
                "peak_bytes": plan.peak,
                "device_bytes": plan.device_bytes,
                "fits": plan.fits,
            }
        out[name] = rows
    return out


# ---- children -------------------------------------------------------------------------------------


class PeakRss:
    """RSS high-water mark while open, minus the RSS on entry (bytes), sampled every 0.5 ms."""

    def __enter__(self) -> PeakRss:
        import psutil

        self._process = psutil.Process()
        self.start = self._process.memory_info().rss
        self.peak = self.start
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.0005)

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def delta(self) -> int:
        return self.peak - self.start


def _learner(model: str, spec: dict[str, Any], extra: list[str]) -> tuple[Any, Any]:
    import torch
    from transformers import AutoTokenizer

    from cluster.data.encoding import pad_id_of
    from learner.learner import Learner

    torch.set_num_threads(spec["cores"])
    cfg = bench_config(model, steps=1, run_root=spec["tmp_dir"], cores=spec["cores"], extra=extra)
    tokenizer = AutoTokenizer.from_pretrained(model)
    pad_id = pad_id_of(tokenizer)
    temperature = cfg.rollout.sampling.temperature
    return cfg, Learner(model, cfg.learner, cfg.seed, temperature, cfg.rollout.dtype, pad_id)


def _one_group(model: str, new_tokens: int) -> Any:
    """1 prompt x MICRO completions of `new_tokens` random non-EOS ids (< 320, valid in both models)."""
    import torch

    from grpo_ray.records import Batch, Completion, Group
    from rollout.engine import model_eos_ids

    eos = set(model_eos_ids(model))
    allowed = torch.tensor([t for t in range(320) if t not in eos])
    g = torch.Generator().manual_seed(0)
    prompt = train_prompts(model, 1)[0]
    completions = [
        Completion(
            allowed[torch.randint(len(allowed), (new_tokens,), generator=g)].tolist(),
            [-5.0] * new_tokens,
            "length",
            "",
        )
        for _ in range(MICRO)
    ]
    group = Group(prompt.index, prompt.token_ids, completions, policy_version=0, worker=0)
    return Batch([group], [[float(j % 2) for j in range(MICRO)]], new_tokens)


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    model, length = spec["model"], spec["new_tokens"]
    chunk = "0" if spec["side"] == "unchunked" else "null"
    _, learner = _learner(
        model,
        spec,
        [
            "prompts_per_step=1",
            f"learner.micro_batch_size={MICRO}",
            f"learner.logprob_chunk_tokens={chunk}",
            f"rollout.sampling.max_new_tokens={length}",
            "rollout.max_model_len=256",
        ],
    )
    batch = _one_group(model, length)
    learner.train_step(batch)  # warm-up: AdamW state, allocator arenas
    begin = time.perf_counter()
    with PeakRss() as rss:
        learner.train_step(batch)
    return {
        "peak_delta_bytes": rss.delta,
        "rss_before_bytes": rss.start,
        "seconds": time.perf_counter() - begin,
        "scored_tokens": MICRO * length,
        "chunk_tokens": learner.chunk_tokens,
    }


def speed_child(spec: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.learner_efficiency import make_batch

    model = spec["model"]
    learners = {
        side: _learner(
            model, spec, [f"learner.logprob_chunk_tokens={'0' if side == 'unchunked' else 'null'}"]
        )[1]
        for side in SIDES
    }
    batch = make_batch(model)
    tokens = float(
        sum(len(g.prompt_token_ids) + len(c.token_ids) for g in batch.groups for c in g.completions)
    )

    def step(side: str) -> float:
        begin = time.perf_counter()
        learners[side].train_step(batch)
        return time.perf_counter() - begin

    for side in SIDES:
        step(side)
    seconds: dict[str, list[float]] = {side: [] for side in SIDES}
    for r in range(spec["rounds"]):
        for side in rotated(list(SIDES), r):
            seconds[side].append(step(side))
    tps = {side: [tokens / s for s in seconds[side]] for side in SIDES}
    return {
        "tokens_per_step": tokens,
        "chunk_tokens": learners["chunked"].chunk_tokens,
        "sides": {side: {"tokens_per_s": summary(tps[side]), "seconds": seconds[side]} for side in SIDES},
        "ratio": ratio_summary(tps["chunked"], tps["unchunked"]),
    }


# ---- report ---------------------------------------------------------------------------------------


def markdown(section: dict[str, Any]) -> list[str]:
    mib = 2**20
    lines = [
        "## 7. Chunked log-probabilities (learner.logprob_chunk_tokens)",
        "",
        f"Goal: the logits part of one train_step's peak memory shrinks >= {MEMORY_GOAL:.0f}x and stops growing "
        f"with tokens x vocab; speed on the bench workload >= {SPEED_GOAL:.2f}x of the unchunked path.",
        "",
        "Memory: peak RSS during one Learner.train_step minus RSS before it (sampled every 0.5 ms, fresh process "
        "per cell, after a warm-up step). Model: the bench shape (hidden 512, 8 layers, NF4 + LoRA r=16, "
        "float32) with the real 151,936-entry vocabulary; one micro-batch of 8 sequences. Logits part = that "
        "peak minus the same step on the 320-entry bench model (same decoder, same activations). Other "
        "engineers' jobs shared the machine; RSS sampling can miss peaks shorter than 0.5 ms.",
        "",
        "| new tokens | scored tokens | side | chunk | step peak MiB | logits part MiB | step s |",
        "|---|---|---|---|---|---|---|",
    ]
    for length, cell in section["memory"].items():
        for side in (*SIDES, "baseline"):
            c = cell["cells"][side]
            part = cell["logits_part_bytes"].get(side)
            label = "chunked, 320-entry vocab" if side == "baseline" else side
            lines.append(
                f"| {length} | {c['scored_tokens']} | {label} | {c['chunk_tokens'] or 'whole'} | "
                f"{c['peak_delta_bytes'] / mib:.0f} | {'' if part is None else f'{part / mib:.0f}'} | "
                f"{c['seconds']:.1f} |"
            )
    lines.append("")
    for length, cell in section["memory"].items():
        shrink = cell["logits_shrink"]
        lines.append(
            f"- {length} new tokens: logits part {shrink:.1f}x smaller chunked ({goal_check(shrink, MEMORY_GOAL)})."
        )
    memory = section["memory"]
    if len(memory) > 1:
        (a, ca), (b, cb) = list(memory.items())[:2]
        for side in SIDES:
            grew = (cb["cells"][side]["peak_delta_bytes"] - ca["cells"][side]["peak_delta_bytes"]) / mib
            lines.append(f"- {side}: step peak grew {grew:.0f} MiB from {a} to {b} new tokens.")
    speed = section["speed"]
    r = speed["ratio"]
    lines += [
        "",
        f"Speed (bench workload, {speed['tokens_per_step']:.0f} tokens per step, chunk {speed['chunk_tokens']} "
        "tokens = one chunk per micro-batch at this 320-entry vocabulary; sides alternated in one process):",
        "",
        "| side | tokens/s |",
        "|---|---|",
        *(f"| {side} | {fmt_range(speed['sides'][side]['tokens_per_s'], 1)} |" for side in SIDES),
        "",
        f"Chunked / unchunked: {fmt_range(r, 3, unit='x')} ({goal_check(r['median'], SPEED_GOAL)}).",
        "",
        "Planner (`cluster/planning`, estimates until a GPU run measures them):",
        "",
        "| config | setting | micro | new tokens | chunk | logits GiB | learner GiB | peak GiB of device | fits |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    gib = 2**30
    for name, rows in section["planner"].items():
        for label, row in rows.items():
            lines.append(
                f"| {name} | {label} | {row['micro_batch_size']} | {row['max_new_tokens']} | "
                f"{row['chunk_tokens'] or 'whole'} | {row['logits_bytes'] / gib:.2f} | {row['learner_bytes'] / gib:.2f} | "
                f"{row['peak_bytes'] / gib:.2f} of {row['device_bytes'] / gib:.1f} | {'yes' if row['fits'] else 'NO'} |"
            )
    return lines


if __name__ == "__main__":
    child_main({"memory": memory_child, "speed": speed_child})
