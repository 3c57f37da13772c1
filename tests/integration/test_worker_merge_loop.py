"""sync: worker_merge end to end: two vLLM rollout workers in Ray actors rebuild the policy themselves.

Three steps of the demo config with a full check every 2 syncs (and so at the first sync, v2 and the
last step, v3): every worker acknowledged every version, its rebuilt weights' checksum equals the
learner's merge (a mismatch raises SyncError), and the sampler's logprobs match the learner's
within the bound of tests/integration/test_grpo_loop.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.driver import run

pytestmark = pytest.mark.integration

# Same error model as test_grpo_loop.py: the engine runs the identical merged weights (checked by
# checksum here), so only vLLM's vs torch's summation order differs; measured gaps there <= 4.8e-5.
LOGPROB_TOLERANCE = 2e-4


def test_three_steps_two_workers_worker_merge(
    tmp_path: Path, ray_session: list[str], tiny_model: Path
) -> None:
    cfg = load_config(
        Path(__file__).resolve().parents[2] / "configs" / "demo.yaml",
        [
            "steps=3",
            "name=worker-merge",
            f"run_root={tmp_path}",
            "sync=worker_merge",
            "sync_check_every=2",
            "data.eval_max_prompts=16",
            "logging.progress_bar=false",
        ],
    )
    result = run(cfg, echo=lambda *_: None)

    assert result.final_version == 3
    assert sorted((ack.worker, ack.version) for ack in result.final_acks) == [(0, 3), (1, 3)]
    # The last sync is a full check: both workers rebuilt the very weights the learner merges.
    checks = {ack.merged_checksum for ack in result.final_acks}
    assert len(checks) == 1 and None not in checks

    steps = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [s for s in steps if "train/loss" in s]
    assert [s["step"] for s in trained] == [1, 2, 3]
    for s in trained:
        assert s["sync/logprob_gap_max"] < LOGPROB_TOLERANCE, s
        assert s["sync/workers_acked"] == 2
