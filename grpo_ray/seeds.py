"""Every seed a run derives from its one `seed`, named, in one place.

All are plain integer arithmetic on the run seed (no RNG state), so a resumed run, a run with a
different number of rollout workers and a re-run on another machine derive the same values. The
multipliers are distinct primes so the streams below do not collide for small seeds and steps; each
result stays below 2**31 where it reaches vLLM (its per-request `seed` is a 32-bit signed int).
"""

from __future__ import annotations

# Distinct primes: the run seed, the step and the slot enter each derivation at a different scale.
_P_LARGE = 1_000_003
_P_MEDIUM = 4099
_P_SMALL = 7919
_SEED_RANGE = 2**31  # vLLM's SamplingParams.seed is a signed 32-bit value


def epoch_order_seed(run_seed: int, epoch: int) -> int:
    """Seed of the shuffle that orders the training prompts in `epoch` (0-based)."""
    return run_seed * _P_LARGE + epoch


def prompt_seeds(run_seed: int, step: int, prompts_per_step: int, group_size: int) -> list[int]:
    """The vLLM request seed of each prompt slot of `step`, slot 0 .. prompts_per_step - 1.

    A seed per prompt slot, not per worker: the same step samples the same groups whatever the
    number of rollout workers or how the slots are dealt to them. vLLM gives the n = group_size
    samples of one request the seeds seed .. seed + n - 1, so the slots are spaced group_size apart:

        seed(step, slot) = ((run_seed * 1_000_003 + step) * 4099 + slot) * group_size  mod 2**31
    """
    base = (run_seed * _P_LARGE + step) * _P_MEDIUM
    return [(base + slot) * group_size % _SEED_RANGE for slot in range(prompts_per_step)]


def eval_round_seed(run_seed: int, step: int) -> int:
    """Seed of the held-out evaluation after `step` (step 0: before training; also `grpo-ray eval`)."""
    return run_seed + step


def eval_sample_seeds(round_seed: int, questions: int, samples: int) -> list[int]:
    """The vLLM request seed of each held-out question's `samples` sampled answers (mean@k, pass@k).

        seed(question) = (round_seed * 7919 + question) * samples  mod 2**31

    spaced `samples` apart for the same reason as `prompt_seeds`.
    """
    return [(round_seed * _P_SMALL + q) * samples % _SEED_RANGE for q in range(questions)]


def engine_seed(run_seed: int, worker_index: int) -> int:
    """The seed a rollout worker's engine starts with (only requests without their own seed use it)."""
    return run_seed + _P_SMALL * worker_index
