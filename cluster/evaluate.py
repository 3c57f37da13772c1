"""Held-out evaluation on the rollout workers (no second engine): greedy pass@1, per-question results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.data import Prompt
from cluster.fleet import Fleet
from rewards.builtin import BUILTINS


def evaluate(
    fleet: Fleet, prompts: list[Prompt], correctness: str, out_dir: Path, tag: str
) -> dict[str, float]:
    """Greedy accuracy over `prompts`; writes one JSON line per question to out_dir/eval_<tag>.jsonl."""
    groups = fleet.generate(prompts, group_size=1, seeds=None, greedy=True)
    by_index = {p.index: p for p in prompts}
    completions = [g.completions[0].text for g in groups]
    rows = [by_index[g.prompt_index].row for g in groups]
    verdicts = BUILTINS[correctness](completions, rows)
    correct = [bool(v) and v == 1.0 for v in verdicts]
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / f"eval_{tag}.jsonl").open("w") as file:
        for group, row, completion, ok in zip(groups, rows, completions, correct, strict=True):
            record: dict[str, Any] = {
                "index": group.prompt_index,
                "gold": row["gold"],
                "completion": completion,
                "correct": ok,
                "policy_version": group.policy_version,
            }
            file.write(json.dumps(record) + "\n")
    return {"eval/accuracy": sum(correct) / max(1, len(correct)), "eval/questions": float(len(correct))}
