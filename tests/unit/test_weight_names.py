"""Checkpoint-name -> engine-name mapping used to check and plan merged syncs."""

from grpo_ray.weight_names import check_names, engine_name, fused_siblings

QWEN2 = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def test_fused_names() -> None:
    assert (
        engine_name("model.layers.3.self_attn.k_proj.weight", QWEN2)
        == "model.layers.3.self_attn.qkv_proj.weight"
    )
    assert engine_name("model.layers.3.mlp.up_proj.bias", QWEN2) == "model.layers.3.mlp.gate_up_proj.bias"
    assert engine_name("model.layers.3.mlp.down_proj.weight", QWEN2) == "model.layers.3.mlp.down_proj.weight"


def test_siblings_close_a_fused_group() -> None:
    assert fused_siblings("model.layers.0.self_attn.v_proj", QWEN2) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    assert fused_siblings("model.layers.0.self_attn.o_proj", QWEN2) == ["model.layers.0.self_attn.o_proj"]


def test_check_names_reports_unknown() -> None:
    engine = ["model.layers.0.self_attn.qkv_proj.weight"]
    assert check_names(["model.layers.0.self_attn.q_proj.weight"], engine, QWEN2) == []
    problems = check_names(["model.layers.0.self_attn.o_proj.weight"], engine, QWEN2)
    assert len(problems) == 1 and "o_proj" in problems[0]
