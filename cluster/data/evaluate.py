"""Held-out evaluation on the rollout workers (no second engine), judged by the reward scorer.

pass@1 is greedy. With k = data.eval_samples > 0, each question also gets k samples at the training
temperature: mean@k is the average correctness of those samples, pass@k the fraction of questions
with at least one correct sample. Correctness is the scorer's weight-0 `correctness` term
(data.correctness), time-limited and isolated like every reward. Per-question results go to
out_dir/eval_<tag>.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.data.prompts import Prompt
from cluster.rollout_pool import RolloutPool
from grpo_ray.records import Group
from grpo_ray.seeds import eval_sample_seeds
from rewards import RewardScorer
from rewards.config import CORRECTNESS_LABEL


def evaluate(
    pool: RolloutPool,
    prompts: list[Prompt],
    scorer: RewardScorer,
    out_dir: Path,
    tag: str,
    samples: int = 0,
    seed: int = 0,
) -> dict[str, float]:
    """Held-out accuracy of the policy the rollout workers hold now.

    `scorer` must carry the correctness term (`RunConfig.scored_rewards()`); `seed` is the round's
    seed (`grpo_ray.seeds.eval_round_seed`), from which each question's sample seeds derive. Returns
    `eval/accuracy` (greedy pass@1, fraction in [0, 1]), `eval/questions` and, with samples = k > 0,
    `eval/mean@k` and `eval/pass@k`. A masked verdict (the function raised, timed out, returned None)
    counts as wrong; RewardFailure if it masks more than rewards.max_masked_fraction.
    """
    rows = {p.index: p.row for p in prompts}
    greedy = _judge(pool.generate(prompts, group_size=1, seeds=None, greedy=True), rows, scorer)
    sampled: dict[int, list[tuple[str, bool]]] = {}
    if samples:
        seeds = eval_sample_seeds(seed, len(prompts), samples)
        sampled = _judge(pool.generate(prompts, group_size=samples, seeds=seeds), rows, scorer)

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
    groups: list[Group], rows: dict[int, dict[str, Any]], scorer: RewardScorer
) -> dict[int, list[tuple[str, bool]]]:
    texts = [c.text for g in groups for c in g.completions]
    flat_rows = [rows[g.prompt_index] for g in groups for _ in g.completions]
    scored = scorer.score(texts, flat_rows, only=[CORRECTNESS_LABEL])
    verdicts = iter(scored.per_term[CORRECTNESS_LABEL])
    return {g.prompt_index: [(c.text, next(verdicts) == 1.0) for c in g.completions] for g in groups}


def _mean(values: list[bool]) -> float:
    return sum(values) / max(1, len(values))
