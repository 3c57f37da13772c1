"""Held-out evaluation on the rollout workers (no second engine).

pass@1 is greedy. With k = data.eval_samples > 0, each question also gets k samples at the training
temperature: mean@k is the average correctness of those samples, pass@k the fraction of questions
with at least one correct sample. Per-question results go to out_dir/eval_<tag>.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.data.prompts import Prompt
from cluster.rollout_pool import RolloutPool
from rewards.builtin import BUILTINS


def evaluate(
    pool: RolloutPool,
    prompts: list[Prompt],
    correctness: str,
    out_dir: Path,
    tag: str,
    samples: int = 0,
    seed: int = 0,
) -> dict[str, float]:
    rows = {p.index: p.row for p in prompts}
    greedy = _judge(pool.generate(prompts, group_size=1, seeds=None, greedy=True), rows, correctness)
    sampled: dict[int, list[tuple[str, bool]]] = {}
    if samples:
        seeds = [(seed * 7_919 + slot) * samples % 2**31 for slot in range(len(prompts))]
        sampled = _judge(pool.generate(prompts, group_size=samples, seeds=seeds), rows, correctness)

    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / f"eval_{tag}.jsonl").open("w") as file:
        for prompt in prompts:
            (completion, correct), *_ = greedy[prompt.index]
            record: dict[str, Any] = {
                "index": prompt.index,
                "gold": prompt.row["gold"],
                "completion": completion,
                "correct": correct,
            }
            if samples:
                record["samples"] = [{"completion": c, "correct": ok} for c, ok in sampled[prompt.index]]
            file.write(json.dumps(record) + "\n")

    values = {
        "eval/accuracy": _mean([greedy[p.index][0][1] for p in prompts]),
        "eval/questions": float(len(prompts)),
    }
    if samples:
        values[f"eval/mean@{samples}"] = _mean([ok for p in prompts for _, ok in sampled[p.index]])
        values[f"eval/pass@{samples}"] = _mean([any(ok for _, ok in sampled[p.index]) for p in prompts])
    return values


def _judge(
    groups: list[Any], rows: dict[int, dict[str, Any]], correctness: str
) -> dict[int, list[tuple[str, bool]]]:
    texts = [c.text for g in groups for c in g.completions]
    flat_rows = [rows[g.prompt_index] for g in groups for _ in g.completions]
    verdicts = iter(BUILTINS[correctness](texts, flat_rows))
    return {g.prompt_index: [(c.text, next(verdicts) == 1.0) for c in g.completions] for g in groups}


def _mean(values: list[bool]) -> float:
    return sum(values) / max(1, len(values))
