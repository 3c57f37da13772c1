"""Memory planner: every component equals a figure worked out by hand below, then the verdicts.

Shapes (published config.json): Qwen2.5-1.5B h=1536 i=8960 28 layers 12 heads 2 kv (head_dim 128);
Qwen2.5-3B h=2048 i=11008 36 layers 16 heads 2 kv (head_dim 128, kv_dim 256);
Qwen2.5-7B h=3584 i=18944 28 layers 28 heads 4 kv (head_dim 128, kv_dim 512), vocab 152064, untied.
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.planning.engine_memory import kv_cache_bytes, vllm_headroom_bytes
from cluster.planning.inputs import CUDA_CONTEXT_BYTES, GiB, MemoryInputs, inputs_from_config
from cluster.planning.learner_memory import (
    activation_bytes,
    learner_resident,
    logits_bytes,
    lora_params,
    nf4_tensor_bytes,
    nf4_weight_bytes,
)
from cluster.planning.shapes import LINEAR_NAMES, QWEN25_SHAPES, ModelShape, ModelShapeError
from cluster.planning.verdict import plan_memory

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
Q15, Q3, Q7 = (QWEN25_SHAPES[f"Qwen2.5-{size}"] for size in ("1.5B", "3B", "7B"))
ALL_LINEAR = list(LINEAR_NAMES)


def inputs(shape: ModelShape = Q3, **changes: object) -> MemoryInputs:
    """Qwen2.5-3B QLoRA r=16 all-linear, bf16, micro 4, 256 + 512 tokens, 16x8 sequences, 24 GiB colocate."""
    base = MemoryInputs(
        shape=shape,
        quantization="nf4",
        double_quant=True,
        compute_bytes=2,
        rollout_bytes=2,
        lora_rank=16,
        lora_targets=ALL_LINEAR,
        micro_batch_size=4,
        max_prompt_tokens=256,
        max_new_tokens=512,
        gradient_checkpointing=True,
        rollout_sequences=16 * 8,
        device_bytes=24 * GiB,
        placement="colocate",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


# ---- parameter counts ------------------------------------------------------------------------


def test_parameter_counts_equal_the_published_totals() -> None:
    # Only true with q/k/v biases, the norms, and 7B's 152064-row embedding: a check on the shapes.
    totals = {name: shape.total_params() for name, shape in QWEN25_SHAPES.items()}
    assert totals == {
        "Qwen2.5-0.5B": 494_032_768,
        "Qwen2.5-1.5B": 1_543_714_304,
        "Qwen2.5-3B": 3_085_938_688,
        "Qwen2.5-7B": 7_615_616_512,
    }


def test_7b_decoder_linears_and_dense_params() -> None:
    # per layer: q 3584*3584 = 12,845,056; k, v 3584*512 = 1,835,008 each; o 12,845,056;
    # gate, up, down 3584*18944 = 67,895,296 each -> 233,046,016; x 28 layers = 6,525,288,448
    assert Q7.decoder_linear_params() == 6_525_288_448
    # embed + lm_head 2 * 152064*3584 = 1,089,994,752; norms (2*28 + 1)*3584 = 204,288;
    # q/k/v biases 28*(3584 + 512 + 512) = 129,024 -> 1,090,328,064
    assert Q7.dense_params() == 1_090_328_064


# ---- learner components ----------------------------------------------------------------------


def test_nf4_bytes_per_tensor_round_up() -> None:
    # 100 params: 50 packed bytes; ceil(100/64) = 2 blocks -> 2*4 = 8 fp32 absmax bytes = 58;
    # double quant: 2 uint8 absmax + 1 fp32 second-level scale (ceil(2/256) = 1) = 50 + 2 + 4 = 56
    assert nf4_tensor_bytes(100, double_quant=False) == 58
    assert nf4_tensor_bytes(100, double_quant=True) == 56


def test_7b_nf4_weights() -> None:
    n = 6_525_288_448  # every 7B linear is a multiple of 64*256, so no rounding anywhere
    # double quant (4.127 bit/param): n/2 = 3,262,644,224 + n/64 = 101,957,632 uint8 absmax
    # + 4 * n/(64*256) = 1,593,088 -> 3,366,194,944 bytes (3.13 GiB)
    assert nf4_weight_bytes(Q7, double_quant=True) == 3_262_644_224 + 101_957_632 + 1_593_088 == 3_366_194_944
    # single quant (4.5 bit/param): n/2 + 4 * n/64 = 3,262,644,224 + 407,830,528
    assert nf4_weight_bytes(Q7, double_quant=False) == 3_670_474_752 == n * 9 // 16


def test_lora_params() -> None:
    # 7B r=16 per layer: q, o 16*(3584+3584) = 114,688; k, v 16*(3584+512) = 65,536;
    # gate, up, down 16*(3584+18944) = 360,448 -> 1,441,792; x 28 = 40,370,176
    assert lora_params(Q7, 16, ALL_LINEAR) == 40_370_176
    # 1.5B r=16: q, o 16*3072 = 49,152; k, v 16*(1536+256) = 28,672; gate/up/down 16*10496 = 167,936
    # -> 659,456 per layer; x 28 = 18,464,768
    assert lora_params(Q15, 16, ALL_LINEAR) == 18_464_768
    # 1.5B r=8 attention only: q, o 8*3072 = 24,576; k, v 8*1792 = 14,336 -> 77,824; x 28 = 2,179,072
    assert lora_params(Q15, 8, ["q_proj", "k_proj", "v_proj", "o_proj"]) == 2_179_072


def test_7b_learner_components() -> None:
    learner = plan_memory(inputs(Q7)).learner
    assert learner["nf4_weights"] == 3_366_194_944
    assert learner["dense_weights"] == 1_090_328_064 * 2 == 2_180_656_128  # bf16
    assert (
        learner["lora"] == learner["grads"] == 40_370_176 * 4 == 161_480_704
    )  # fp32, as the learner keeps it
    assert learner["optimizer"] == 40_370_176 * 2 * 4 == 322_961_408  # AdamW exp_avg + exp_avg_sq, fp32
    assert learner["overhead"] == GiB  # 512 MiB CUDA context + 512 MiB allocator slack


def test_3b_activations() -> None:
    # per token per layer (bf16, h=2048, q_dim=2048, i=11008, 16 heads, r=16, 7 adapted):
    # norms 2*(4*2048 + 4) = 16,392; normed inputs 2*2*2048 = 8,192; attention 5*2*2048 = 20,480;
    # lse 4*16 = 64; MLP 4*2*11008 = 88,064; LoRA 7*2*16 = 224 -> 133,416
    # tokens = micro 4 * (256 + 512) = 3072; final norm 4*2048 + 4 = 8,196 per token;
    # dequantized gate_proj 2048*11008*2 = 45,088,768
    # checkpointed: 3072 * (36*2*2048 + 133,416 + 8,196) + 45,088,768 = 3072 * 289,068 + 45,088,768
    assert activation_bytes(inputs()) == 888_016_896 + 45_088_768 == 933_105_664
    # not checkpointed: 3072 * (36*133,416 + 8,196) + 45,088,768 = 3072 * 4,811,172 + 45,088,768
    assert activation_bytes(inputs(gradient_checkpointing=False)) == 14_779_920_384 + 45_088_768


def test_3b_logits_unchunked() -> None:
    # B * V * (2*L + 24*T) = 4 * 151936 * (2*768 + 24*512) = 4 * 151936 * 13,824
    assert plan_memory(inputs(logprob_chunk_tokens=0)).learner["logits"] == 8_401_453_056


def test_3b_logits_chunked() -> None:
    # default chunk for V = 151936: 2^27 // (4V) = 220 -> 192 tokens; N = B*T = 4*512 = 2048 tokens
    # 8 * C * V = 8 * 192 * 151936 = 233,373,696; 3 * N * h * c = 3 * 2048 * 2048 * 2 = 25,165,824
    assert plan_memory(inputs()).learner["logits"] == 233_373_696 + 25_165_824 == 258_539_520
    # a chunk larger than the micro-batch's tokens holds only those: C = min(4096, 2048)
    assert logits_bytes(inputs(logprob_chunk_tokens=4096)) == 8 * 2048 * 151936 + 25_165_824


def test_the_logits_line_is_under_1_gib_at_micro_batch_8() -> None:
    # the target, for both shipped model sizes (bf16, 512 new tokens, default chunk 192)
    for shape in (Q3, Q7):
        logits = logits_bytes(inputs(shape, micro_batch_size=8))
        assert logits <= GiB, (shape, logits / GiB)
        # and it no longer grows with tokens x vocab: 4x the tokens adds only the [N, h] terms
        longer = logits_bytes(inputs(shape, micro_batch_size=8, max_new_tokens=2048))
        assert longer - logits == 3 * 8 * (2048 - 512) * shape.hidden_size * 2


def test_no_quantization_keeps_every_weight_dense() -> None:
    learner = plan_memory(inputs(quantization="none")).learner
    assert learner["nf4_weights"] == 0
    assert learner["dense_weights"] == 3_085_938_688 * 2


# ---- rollout components ----------------------------------------------------------------------


def test_kv_cache() -> None:
    # 7B: 2 * 28 layers * 4 kv heads * 128 * 2 bytes = 57,344 bytes/token;
    # 128 sequences * 768 tokens = 98,304 tokens -> 5,637,144,576
    assert kv_cache_bytes(Q7, 2, 128, 768) == 57_344 * 98_304 == 5_637_144_576
    # 3B: 2 * 36 * 2 * 128 * 2 = 36,864 bytes/token -> 3,623,878,656
    assert plan_memory(inputs()).rollout["kv_cache"] == 36_864 * 98_304 == 3_623_878_656


def test_vllm_headroom_follows_its_defaults() -> None:
    # 24 GiB: 8192 tokens * 2 * (2*2048 + 3*11008) = 608,174,080; sampler 256 * 151936 * 12 = 466,747,392
    assert vllm_headroom_bytes(Q3, 2, True, 24 * GiB) == 608_174_080 + 466_747_392
    # >= 70 GiB: 16384 tokens and 1024 seqs; CUDA graphs add 1 GiB
    assert vllm_headroom_bytes(Q3, 2, False, 80 * GiB) == 1_216_348_160 + 1_866_989_568 + GiB


def test_3b_rollout_and_utilization() -> None:
    plan = plan_memory(inputs())
    # weights: 3,085,938,688 params * 2 bytes (all of them: the engine runs merged dense weights)
    assert plan.rollout["weights"] == 6_171_877_376
    budget = 6_171_877_376 + 3_623_878_656 + 1_074_921_472  # weights + KV + headroom (not the context)
    assert plan.rollout_total == budget + CUDA_CONTEXT_BYTES
    # 10,870,677,504 / 25,769,803,776 = 0.42184 -> rounded up to 0.422
    assert plan.gpu_memory_utilization == 0.422


# ---- verdicts --------------------------------------------------------------------------------


def test_3b_qlora_colocate_fits_24gb() -> None:
    plan = plan_memory(inputs())
    assert plan.fits and plan.advice == []
    # train = learner + the sleeping engine's context; generate = engine + learner resident state
    assert plan.phases["train"] == plan.learner_total + CUDA_CONTEXT_BYTES
    assert plan.phases["generate"] == plan.rollout_total + learner_resident(plan.learner)
    assert plan.peak == max(plan.phases.values()) <= 24 * GiB
    assert 0 < plan.gpu_memory_utilization < 1
    text = plan.render()
    assert "fits" in text and "NOT" not in text and "gpu_memory_utilization = 0.422" in text


def test_7b_big_micro_batch_without_checkpointing_does_not_fit() -> None:
    plan = plan_memory(inputs(Q7, micro_batch_size=16, gradient_checkpointing=False))
    assert not plan.fits and plan.peak > 24 * GiB
    text = "\n".join(plan.advice)
    assert "turn on learner.gradient_checkpointing, with learner.share_prompt_forward off (saves" in text
    assert "lower learner.micro_batch_size from 16 to 2 (saves" in text
    # the suggestion is the largest divisor of 16 whose training phase fits
    assert (
        plan_memory(inputs(Q7, micro_batch_size=2, gradient_checkpointing=False)).phases["train"] <= 24 * GiB
    )
    assert (
        plan_memory(inputs(Q7, micro_batch_size=4, gradient_checkpointing=False)).phases["train"] > 24 * GiB
    )
    # generation does not fit either: 7B bf16 weights (14.2 GiB) + KV + learner resident state
    assert "placement: split" in text
    assert "does NOT fit" in plan.render()


def test_split_checks_each_device_on_its_own() -> None:
    plan = plan_memory(inputs(Q7, placement="split"))
    assert plan.phases == {"train": plan.learner_total, "generate": plan.rollout_total}
    assert plan.fits == (max(plan.learner_total, plan.rollout_total) <= 24 * GiB)


def test_unknown_lora_target_is_an_error() -> None:
    with pytest.raises(ValueError, match="cannot size LoRA on \\['lm_head'\\]"):
        inputs(lora_targets=["q_proj", "lm_head"])


# ---- shapes from configs ---------------------------------------------------------------------


QWEN3B_CONFIG = {
    "model_type": "qwen2",
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
}


def test_shape_from_config_dict() -> None:
    assert ModelShape.from_config_dict(QWEN3B_CONFIG) == Q3
    llama = {**QWEN3B_CONFIG, "model_type": "llama", "head_dim": 64, "attention_bias": False}
    shape = ModelShape.from_config_dict({"model_type": "llava", "text_config": llama})
    assert (shape.head_dim, shape.q_dim, shape.qkv_bias) == (64, 1024, False)
    with pytest.raises(ModelShapeError, match="lacks vocab_size"):
        ModelShape.from_config_dict({k: v for k, v in QWEN3B_CONFIG.items() if k != "vocab_size"})


def _fake_hub(monkeypatch: pytest.MonkeyPatch, download: object) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=download))


def test_from_pretrained_local_builtin_and_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text(json.dumps(QWEN3B_CONFIG))
    assert ModelShape.from_pretrained(str(tmp_path)) == Q3

    def offline(repo: str, filename: str) -> str:
        raise OSError("offline and not cached")

    _fake_hub(monkeypatch, offline)
    assert ModelShape.from_pretrained("Qwen/Qwen2.5-7B-Instruct") == Q7  # built in: the hub is not asked
    with pytest.raises(ModelShapeError, match=r"not in the Hugging Face cache.*offline"):
        ModelShape.from_pretrained("someone/unknown-model")

    _fake_hub(monkeypatch, lambda repo, filename: str(tmp_path / filename))
    assert ModelShape.from_pretrained("someone/cached-model") == Q3


def test_inputs_from_config() -> None:
    cfg = load_config(
        DEMO,
        [
            "placement=colocate",
            "rollout.num_workers=1",
            "learner.compute_dtype=bfloat16",
            "learner.gradient_checkpointing=true",
            "learner.share_prompt_forward=false",
            "learner.micro_batch_size=4",
            "learner.lora.target_modules=attention",
        ],
    )
    got = inputs_from_config(cfg, Q3, device_gib=24)
    assert got.rollout_sequences == 16 * 8  # one engine holds every prompt x group 8
    assert (got.compute_bytes, got.rollout_bytes) == (2, 4)  # demo rollout dtype is float32
    assert got.lora_targets == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (got.max_prompt_tokens, got.max_new_tokens) == (48, 8)
    assert (got.micro_batch_size, got.gradient_checkpointing, got.placement) == (4, True, "colocate")
    assert got.device_bytes == 24 * GiB
    split = inputs_from_config(load_config(DEMO), Q3)
    assert split.rollout_sequences == 8 * 8  # 16 prompts over 2 engines


def test_unchunked_logits_advice_names_the_chunk_knob() -> None:
    plan = plan_memory(inputs(Q7, micro_batch_size=8, placement="split", logprob_chunk_tokens=0))
    assert not plan.fits  # 7B at micro 8 with whole [tokens x vocab] logits: 15.7 GiB of them
    text = "\n".join(plan.advice)
    assert "remove learner.logprob_chunk_tokens: 0 to compute them in chunks (saves" in text
    assert plan.refusal().startswith("the run does not fit in 24 GiB:\n  the training phase needs")


@pytest.mark.parametrize("path", sorted(DEMO.parent.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_passes_its_own_check(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cluster.cli import main

    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "memory plan" in out and ": fits," in out and out.rstrip().endswith("config ok")


def test_an_unresolvable_hub_host_fails_at_once_not_after_five_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real huggingface_hub, an empty cache, and an endpoint whose name can never resolve
    # (RFC 2606 reserves .invalid): its download would retry 5 times with backoff (~23 s) on a name
    # that cannot resolve. The spy counts the downloads that would go to the network.
    import huggingface_hub
    from huggingface_hub import constants

    from cluster.planning import shapes

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    real, online = huggingface_hub.hf_hub_download, []

    def spy(*args: object, **kwargs: object) -> str:
        if not kwargs.get("local_files_only"):
            online.append(args)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    with pytest.raises(ModelShapeError, match="not in the Hugging Face cache"):
        shapes.hub_config_path("someone/unknown-model")
    assert online == []
