"""A cost model of one GRPO step, synchronous or with asynchronous rollouts (max_staleness = k).

Phases, in seconds per step: `generate_s` is the step's sampling on ONE rollout worker (W workers
split it into chunks: generate_s / W), `reward_s` the driver's scoring, `train_s` the learner's
update, `sync_s` export + transfer + in-place reload of one policy version.

    k = 0:  T = generate_s / W + reward_s + train_s + sync_s            (the phases take turns)
    k >= 1: T = max(generate_s / W + reward_s + sync_s, train_s + sync_s)

With k >= 1 the pool samples step s + 1 while the learner trains step s, so the step takes as long
as the slower of the two sides. sync_s is charged to both sides, which over-counts it (the export
is the learner's, the reload the workers'): the model errs towards predicting less gain. It holds
the phases constant: a larger k only absorbs variation between steps, which this model has none
of, so every k >= 1 gives the same T. Pure Python, unit-tested in tests/unit/test_step_time_model.py.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PhaseTimes:
    generate_s: float  # one step's prompts sampled by one rollout worker
    reward_s: float
    train_s: float
    sync_s: float


def step_time(phases: PhaseTimes, workers: int, max_staleness: int) -> float:
    """Predicted seconds per step with `workers` rollout workers (the equations in the docstring).

    Raises ValueError for workers < 1 or a negative staleness."""
    if workers < 1 or max_staleness < 0:
        raise ValueError(f"need workers >= 1 and max_staleness >= 0, got {workers}, {max_staleness}")
    rollout = phases.generate_s / workers + phases.reward_s
    if max_staleness == 0:
        return rollout + phases.train_s + phases.sync_s
    return max(rollout + phases.sync_s, phases.train_s + phases.sync_s)


def speedup(phases: PhaseTimes, workers: int, max_staleness: int) -> float:
    """Synchronous step time over the step time at `max_staleness` (1.0 for k = 0)."""
    return step_time(phases, workers, 0) / step_time(phases, workers, max_staleness)


# The shipped 7B cluster config (configs/gsm8k_qwen2.5-7b_cluster.yaml: 32 prompts x 8, at most 512
# new tokens, 4 engines on A10G GPUs, an NF4 learner with gradient checkpointing on one A10G).
# ASSUMPTIONS, not measurements (no GPU was lent to measure them):
#   completions average 300 tokens, prompts 150;
#   one engine decodes its 64 sequences at 1,000 tokens/s in total  -> 256 x 300 / 1,000 = 77 s alone;
#   the learner processes 1,500 tokens/s forward + backward        -> 256 x 450 / 1,500 = 77 s;
#   scoring 256 completions with numeric_match + format: 0.5 s;
#   a merged bf16 sync (15.2 GB) to every engine: 15 s (object store at ~1 GB/s, reload included).
CLUSTER_7B = PhaseTimes(generate_s=256 * 300 / 1000, reward_s=0.5, train_s=256 * 450 / 1500, sync_s=15.0)
CLUSTER_7B_WORKERS = 4
