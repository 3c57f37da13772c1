"""max_staleness with the real components (vLLM engines, the QLoRA learner, the reward scorer).

- max_staleness = 0 is the synchronous loop: `run` matches, metric for metric, a hand-driven
  generate -> score -> train -> sync loop over the same actors (what the driver did before the
  step loop became a pipeline).
- max_staleness = 1: no trained group is more than one version old, the pool really runs ahead,
  the run drains (no actor of the run left, nothing in flight) and still learns the same steps.
- Resume with max_staleness = 1 (a SIGKILLed learner restarts from checkpoint 2, through the same
  loader as --resume). The claim: steps up to the checkpoint are kept as logged; every later step
  trains on the same prompts (the data cursor per step is the uninterrupted run's) with the same
  seeds; the groups that were in flight at the checkpoint are resampled by the restored policy
  (so step 3 is staleness 0 where the uninterrupted run had 1); no step is lost or logged twice.
  Bit-identity of the later steps is not claimed for k >= 1: which policy version samples a chunk
  depends on when a worker takes it.

Tolerances: same machine, same kernels, same shapes: rewards compared exactly, losses to 1e-6 as in
test_resume.py (slack for a last reduction split differently between threads).
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from test_fault_tolerance import kill_learner_after_checkpoint, kill_learner_when

from cluster.config import RunConfig, load_config
from cluster.data.prompts import PromptStream
from cluster.driver import _load_inputs, _start, model_path, run
from cluster.policy_sync import sync
from grpo_ray.records import Batch
from grpo_ray.seeds import prompt_seeds
from rewards import RewardScorer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
LOSS_TOLERANCE = 1e-6
STEPS = 4


def _cfg(run_root: Path, name: str, *extra: str) -> RunConfig:
    return load_config(
        ROOT / "configs" / "demo.yaml",
        [
            f"run_root={run_root}",
            f"name={name}",
            f"steps={STEPS}",
            "checkpoint_every=2",
            "keep_checkpoints=10",
            "data.eval_files=[]",
            "logging.progress_bar=false",
            "learner.learning_rate=1.0e-3",
            *extra,
        ],
    )


def _per_step(run_dir: Path) -> dict[int, dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    trained = [r for r in rows if "train/loss" in r]
    assert len({r["step"] for r in trained}) == len(trained), "a step was logged twice"
    return {r["step"]: r for r in trained}


def _serial_reference(cfg: RunConfig) -> dict[int, dict[str, float]]:
    """The synchronous loop written out by hand over the same actors and scorer."""
    model = model_path(cfg)
    encoder, train, _ = _load_inputs(cfg, model, lambda *_: None)
    stream = PromptStream(train.prompts, seed=cfg.seed)
    out: dict[int, dict[str, float]] = {}
    with ExitStack() as stack:
        scorer = stack.enter_context(RewardScorer(cfg.scored_rewards()))
        learner, pool = _start(cfg, model, encoder, stack, lambda *_: None)
        sync(cfg, learner, pool, include_base=True)
        for step in range(1, cfg.steps + 1):
            prompts = stream.take(cfg.prompts_per_step)
            seeds = prompt_seeds(cfg.seed, step, cfg.prompts_per_step, cfg.group_size)
            groups = pool.generate(prompts, cfg.group_size, seeds=seeds)
            rows = {p.index: p.row for p in prompts}
            scored = scorer.score(
                [c.text for g in groups for c in g.completions],
                [rows[g.prompt_index] for g in groups for _ in g.completions],
            )
            size = cfg.group_size
            rewards = [scored.rewards[i : i + size] for i in range(0, len(scored.rewards), size)]
            metrics = learner.train_step(Batch(groups, rewards, cfg.rollout.sampling.max_new_tokens))
            version, _ = sync(cfg, learner, pool, include_base=False)
            versions = {g.policy_version for g in groups}
            out[step] = {**metrics, **scored.metrics, "version": float(version), "sampled_by": versions}
    return out


def test_staleness_zero_is_the_synchronous_loop(tmp_path: Path, ray_session: list[str]) -> None:
    cfg = _cfg(tmp_path, "sync0", "max_staleness=0", "checkpoint_every=0")
    reference = _serial_reference(cfg)
    run(cfg, echo=lambda *_: None)
    steps = _per_step(cfg.run_dir)
    assert sorted(steps) == sorted(reference)
    for step, expected in reference.items():
        assert expected["sampled_by"] == {step - 1}
        got = steps[step]
        assert got["rollout/policy_version_min"] == step - 1
        assert got["async/staleness_max"] == 0
        for key in ("reward/numeric_match/mean", "train/num_tokens", "train/advantage_abs_mean"):
            assert got[key] == expected[key], (step, key)
        for key in ("train/loss", "train/grad_norm", "sync/logprob_gap_max"):
            assert abs(got[key] - expected[key]) <= LOSS_TOLERANCE, (step, key, got[key], expected[key])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, ray_session: list[str]) -> dict[int, dict]:
    import ray

    cfg = _cfg(tmp_path_factory.mktemp("async"), "async1", "max_staleness=1")
    result = run(cfg, echo=lambda *_: None)
    assert result.final_version == STEPS
    # drained: every worker acknowledged the final policy, and no actor of the run is left
    assert sorted((a.worker, a.version) for a in result.final_acks) == [(0, STEPS), (1, STEPS)]
    assert not [n for n in ray.util.list_named_actors() if n.startswith(f"{cfg.name}.")]
    return _per_step(cfg.run_dir)


def test_staleness_one_trains_on_groups_at_most_one_version_old(uninterrupted: dict[int, dict]) -> None:
    steps = uninterrupted
    assert sorted(steps) == list(range(1, STEPS + 1))
    for step, values in steps.items():
        assert values["async/staleness_max"] <= 1
        assert values["rollout/policy_version_min"] >= step - 2
        assert values["data/cursor"] == step * 16
        assert values["rollout/groups"] == 16
    # step 2's prompts were queued with step 1's, before any update: they are one version old
    assert steps[2]["async/staleness_max"] == 1
    assert steps[1]["async/staleness_max"] == 0


def test_resume_with_staleness_one_resamples_what_was_in_flight(
    tmp_path: Path, uninterrupted: dict[int, dict]
) -> None:
    cfg = _cfg(tmp_path, "async1kill", "max_staleness=1")
    lines: list[str] = []
    finish = kill_learner_after_checkpoint(cfg, 2)
    run(cfg, echo=lines.append)
    finish()

    assert any("restarting it from checkpoint step_000002" in line for line in lines), lines
    steps = _per_step(cfg.run_dir)
    assert sorted(steps) == list(range(1, STEPS + 1))  # nothing lost, nothing logged twice
    for step in (1, 2):  # before the checkpoint: as logged, the uninterrupted run's exactly
        assert steps[step]["reward/mean"] == uninterrupted[step]["reward/mean"]
        assert abs(steps[step]["train/loss"] - uninterrupted[step]["train/loss"]) <= LOSS_TOLERANCE
    for step in range(1, STEPS + 1):  # the same prompts in every step
        assert steps[step]["data/cursor"] == uninterrupted[step]["data/cursor"]
        assert steps[step]["async/staleness_max"] <= 1
    # step 3 was in flight at the checkpoint: resampled by the restored policy v2, not trained stale
    assert steps[3]["rollout/policy_version_min"] == 2 and steps[3]["async/staleness_max"] == 0


def test_a_learner_lost_before_the_first_checkpoint_does_not_evaluate_step_0_twice(
    tmp_path: Path, ray_session: list[str]
) -> None:
    cfg = _cfg(
        tmp_path,
        "async1eval",
        "max_staleness=1",
        "checkpoint_every=0",
        "data.eval_files=[assets/arith/test.jsonl]",
        "data.eval_max_prompts=16",
    )
    lines: list[str] = []
    finish = kill_learner_when(cfg, lambda: 1 in _logged_steps(cfg.run_dir), "step 1")
    result = run(cfg, echo=lines.append)
    finish()
    assert any("restarting it from step 0" in line for line in lines), lines
    assert _logged_steps(cfg.run_dir).count(0) == 1  # step 0's evaluation, once
    assert sorted(_per_step(cfg.run_dir)) == list(range(1, STEPS + 1))
    assert result.accuracy_before is not None


def _logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line)["step"] for line in text.splitlines() if line]
