"""The named seed derivations (grpo_ray/seeds.py) and the even split (grpo_ray/partition.py)."""

from __future__ import annotations

import pytest

from grpo_ray.partition import even_counts, split_by_counts, split_evenly
from grpo_ray.seeds import engine_seed, epoch_order_seed, eval_sample_seeds, prompt_seeds


def test_prompt_seeds_are_the_formula_and_spaced_a_group_apart() -> None:
    # seed 3, step 2, group 4: base = (3 * 1_000_003 + 2) * 4099 = 12_297_045_089; slot k -> (base + k) * 4
    seeds = prompt_seeds(3, 2, prompts_per_step=5, group_size=4)
    assert seeds == [(12_297_045_089 + k) * 4 % 2**31 for k in range(5)]
    samples = {s + j for s in seeds for j in range(4)}  # vLLM seeds a request's n samples s .. s + n - 1
    assert len(samples) == 5 * 4, "no two samples of a step share a seed"
    assert all(0 <= s < 2**31 for s in seeds)
    assert prompt_seeds(3, 3, 5, 4) != seeds and prompt_seeds(4, 2, 5, 4) != seeds


def test_a_slot_seed_depends_only_on_run_seed_step_and_slot() -> None:
    # A step drawing fewer prompts gets the same seeds for the slots it has: nothing else enters.
    assert prompt_seeds(0, 7, 16, 8)[:5] == prompt_seeds(0, 7, 5, 8)


def test_other_derivations_keep_their_values() -> None:
    assert epoch_order_seed(2, 1) == 2 * 1_000_003 + 1
    assert eval_sample_seeds(5, 3, 4) == [(5 * 7919 + q) * 4 % 2**31 for q in range(3)]
    assert [engine_seed(1, i) for i in range(3)] == [1, 7920, 15839]


def test_even_split() -> None:
    assert even_counts(5, 2) == [3, 2]
    assert even_counts(2, 3) == [1, 1, 0]
    assert split_evenly(list("abcde"), 3) == [["a", "b"], ["c", "d"], ["e"]]
    assert split_by_counts([1, 2, 3], [0, 3]) == [[], [1, 2, 3]]
    with pytest.raises(ValueError, match="sum to 2"):
        split_by_counts([1, 2, 3], [1, 1])
    with pytest.raises(ValueError):
        even_counts(3, 0)
