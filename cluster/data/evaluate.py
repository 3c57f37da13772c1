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
    """Held-out accuracy of the policy the rollout workers hold now (blocking; see `EvalRound`)."""
    pool.admit(block=not pool.active)
    round_ = EvalRound(pool, prompts, samples, seed)
    while not round_.complete():
        pool.dispatch()
        pool.wait()
    return round_.finish(scorer, out_dir, tag)


class EvalRound:
    """One held-out evaluation, queued on the rollout pool; it runs while the driver does other work.

    `policy_version`: the round's chunks run only on workers holding exactly that version, so a
    round queued right after a sync measures that policy even while the learner trains the next one
    (None: whatever the workers hold when they take it). `seed` is the round's seed
    (`grpo_ray.seeds.eval_round_seed`), from which each question's sample seeds derive.
    """

    def __init__(
        self,
        pool: RolloutPool,
        prompts: list[Prompt],
        samples: int = 0,
        seed: int = 0,
        policy_version: int | None = None,
    ) -> None:
        self.pool, self.prompts, self.samples = pool, prompts, samples
        self.policy_version = policy_version
        self.greedy = pool.submit(prompts, 1, None, greedy=True, policy_version=policy_version)
        self.sampled = None
        if samples:
            seeds = eval_sample_seeds(seed, len(prompts), samples)
            self.sampled = pool.submit(prompts, samples, seeds, policy_version=policy_version)

    def complete(self) -> bool:
        return self.pool.complete(self.greedy) and (self.sampled is None or self.pool.complete(self.sampled))

    def cancel(self) -> None:
        for key in (self.greedy, self.sampled):
            if key is not None:
                self.pool.cancel(key)

    def finish(self, scorer: RewardScorer, out_dir: Path, tag: str) -> dict[str, float]:
        """Judge the completed round and write out_dir/eval_<tag>.jsonl.

        `scorer` must carry the correctness term (`RunConfig.scored_rewards()`). Returns
        `eval/accuracy` (greedy pass@1, fraction in [0, 1]), `eval/questions`, `eval/policy_version`
        (the oldest policy version that sampled an answer) and, with samples =
        k > 0, `eval/mean@k` and `eval/pass@k`. A masked verdict (the function raised, timed out,
        returned None) counts as wrong; RewardFailure if it masks more than
        rewards.max_masked_fraction.
        """
        prompts, samples = self.prompts, self.samples
        rows = {p.index: p.row for p in prompts}
        greedy_groups = self.pool.results(self.greedy)
        greedy = _judge(greedy_groups, rows, scorer)
        sampled: dict[int, list[tuple[str, bool]]] = {}
        versions = [g.policy_version for g in greedy_groups]
        if self.sampled is not None:
            sampled_groups = self.pool.results(self.sampled)
            sampled = _judge(sampled_groups, rows, scorer)
            versions += [g.policy_version for g in sampled_groups]

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
            "eval/policy_version": float(min(versions, default=-1)),  # the oldest policy that answered
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
