"""Config loading: errors name the key and the fix; batch arithmetic is checked; plan is derived."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import ConfigError, load_config
from cluster.planning.batch_plan import derive_plan

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def test_demo_config_loads_and_plans() -> None:
    cfg = load_config(DEMO)
    plan = derive_plan(cfg)
    # 16 prompts x 8 = 128 sequences; micro-batch 64 -> 2 micro-batches; 2 workers -> 8 prompts each
    assert plan.sequences_per_step == 128
    assert plan.micro_batches_per_step == 128 // cfg.learner.micro_batch_size
    assert plan.prompts_per_worker == [8, 8]
    assert "rollout-1" in plan.render(cfg)


def test_overrides_are_typed_and_nested() -> None:
    cfg = load_config(DEMO, ["steps=3", "learner.lora.rank=4", "rollout.sampling.temperature=0.7"])
    assert (cfg.steps, cfg.learner.lora.rank, cfg.rollout.sampling.temperature) == (3, 4, 0.7)


def test_unknown_key_suggests_the_right_one() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'rollout.num_worker' — did you mean 'num_workers'"):
        load_config(DEMO, ["rollout.num_worker=3"])


def test_wrong_type_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"'learner.lora.rank'.*got 'big'"):
        load_config(DEMO, ["learner.lora.rank=big"])


@pytest.mark.parametrize(
    "override", ["max_staleness=true", "rollout.num_workers=true", "learner.loss.tis_cap=false"]
)
def test_a_boolean_is_not_a_number(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"'{key}'.*is a boolean, but this setting is a number"):
        load_config(DEMO, [override])
    assert load_config(DEMO, ["data.token_cache=false"]).data.token_cache is False  # a bool field still is


def test_batch_arithmetic_is_checked_with_a_fix() -> None:
    # 16 x 8 = 128 sequences are not a multiple of 48; the largest divisor of 128 below 48 is 32
    with pytest.raises(ConfigError, match=r"128 is not a multiple of learner.micro_batch_size = 48.*e.g. 32"):
        load_config(DEMO, ["learner.micro_batch_size=48"])


def test_sequence_budget_must_fit_the_engine() -> None:
    with pytest.raises(ConfigError, match=r"exceeds rollout.max_model_len = 64"):
        load_config(DEMO, ["rollout.sampling.max_new_tokens=32"])


def test_colocate_needs_one_engine() -> None:
    with pytest.raises(ConfigError, match="colocate"):
        load_config(DEMO, ["placement=colocate"])


def test_group_of_one_is_rejected() -> None:
    with pytest.raises(ConfigError, match="group_size"):
        load_config(DEMO, ["group_size=1"])


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_malformed_override() -> None:
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        load_config(DEMO, ["steps"])


def test_config_imports_without_heavy_frameworks() -> None:
    import subprocess
    import sys

    code = (
        "import sys, cluster.config, cluster.planning.batch_plan; "
        "heavy = [m for m in ('torch', 'vllm', 'ray') if m in sys.modules]; print(heavy); assert not heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=DEMO.parents[1])


@pytest.mark.parametrize("path", sorted((DEMO.parent).glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert derive_plan(cfg).sequences_per_step == cfg.prompts_per_step * cfg.group_size


def test_correctness_is_a_verdict_or_a_function_path_and_becomes_a_weight_zero_term() -> None:
    cfg = load_config(DEMO, ["data.correctness=my_task.checks:is_right"])
    scored = cfg.scored_rewards()
    assert [(t.label, t.function, t.weight) for t in scored.terms] == [
        ("numeric_match", "numeric_match", 1.0),
        ("correctness", "my_task.checks:is_right", 0.0),
    ]
    assert cfg.rewards.terms == scored.terms[:1]  # the config itself is left as loaded
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, ["data.correctness=format"])  # a shaping reward, not a verdict
    message = str(info.value)
    assert "data.correctness" in message and "numeric_match" in message and "module:function" in message


def test_a_reward_term_may_not_take_the_correctness_label() -> None:
    with pytest.raises(ConfigError, match=r"reserved for data\.correctness"):
        load_config(DEMO, ["rewards.terms=[{function: numeric_match, name: correctness}]"])
