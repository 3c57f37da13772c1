"""A GSM8K-format task through the real loop: `####` golds, numeric + format rewards, eval with k samples.

The tiny model cannot do GSM8K (rewards are mostly 0); this checks the plumbing a real GSM8K run uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.driver import run

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gsm8k"


def test_gsm8k_format_run_writes_eval_results(
    tmp_path: Path, ray_session: list[str], tiny_model: Path
) -> None:
    cfg = load_config(
        Path(__file__).resolve().parents[2] / "configs" / "demo.yaml",
        [
            "name=gsm8k-fixture",
            f"run_root={tmp_path}",
            "steps=2",
            "prompts_per_step=4",
            "group_size=4",
            "learner.micro_batch_size=8",
            "rollout.num_workers=1",
            "logging.progress_bar=false",
            f"data.train_files=[{FIXTURES / 'train.jsonl'}]",
            f"data.eval_files=[{FIXTURES / 'test.jsonl'}]",
            "data.gold_format=gsm8k",
            "data.eval_samples=2",
            "data.max_prompt_tokens=110",
            "rollout.max_model_len=128",
            "rollout.sampling.max_new_tokens=16",
            "rewards.terms=[{function: numeric_match}, {function: format, weight: 0.1}]",
        ],
    )
    result = run(cfg, echo=lambda *_: None)
    assert result.final_version == 2

    final_eval = result.run_dir / "eval" / "eval_step_0002.jsonl"
    records = [json.loads(line) for line in final_eval.read_text().splitlines()]
    assert {r["gold"] for r in records} <= {"43", "72", "27", "7", "4250", "70"}  # the text after '####'
    assert all(len(r["samples"]) == 2 for r in records)
    steps = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [s for s in steps if "eval/pass@2" in s]
    # fractions of counts, ordered by definition (mean@k <= pass@k): exact, no tolerance needed
    assert final and 0.0 <= final[-1]["eval/mean@2"] <= final[-1]["eval/pass@2"] <= 1.0
    trained = [s for s in steps if "train/loss" in s]
    assert all("reward/numeric_match/mean" in s and "reward/format/mean" in s for s in trained)
