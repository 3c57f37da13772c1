"""The shipped tiny model loads through vLLM (in a RolloutWorker actor) and in 4-bit through bitsandbytes,
by the same `from_pretrained(directory)` path a hub id takes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bounds import assert_greedy_agrees, forward_atol, greedy_reference

from cluster.config import load_config
from cluster.data.prompts import load_split

pytestmark = pytest.mark.integration


def _held_out(tiny_model: Path, count: int) -> list:
    from transformers import AutoTokenizer

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    held_out = load_split(cfg.data, "eval", 0, tokenizer)
    assert held_out is not None
    return held_out.prompts[:count]


@pytest.mark.numeric
def test_vllm_greedy_matches_transformers(tiny_model: Path, ray_session: None) -> None:
    import ray
    from transformers import AutoModelForCausalLM

    from cluster.config import load_config as load
    from cluster.placement import worker_env
    from rollout.worker import RolloutWorker

    cfg = load(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
    prompts = _held_out(tiny_model, 12)
    worker = (
        ray.remote(RolloutWorker)
        .options(num_cpus=0.5, runtime_env={"env_vars": worker_env(cfg)})
        .remote(0, str(tiny_model), cfg.rollout, 0, None)
    )
    try:
        groups = ray.get(worker.generate.remote([(p.index, p.token_ids) for p in prompts], 1, None, True))
        info = ray.get(worker.info.remote())
    finally:
        ray.kill(worker)

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    assert set(info["eos_ids"]) == set(model.generation_config.eos_token_id)
    for prompt, group in zip(prompts, groups, strict=True):
        expected, margins, scale = greedy_reference(
            model, prompt.token_ids, cfg.rollout.sampling.max_new_tokens
        )
        got = group.completions[0].token_ids
        assert len(got) > 0, prompt.row
        # vLLM's float32 kernels vs torch's: the same tokens except past a near-tie (the forward model)
        assert_greedy_agrees(got, expected, margins, forward_atol(scale))


def test_loads_in_4bit_with_lora(tiny_model: Path) -> None:
    import bitsandbytes as bnb

    from learner.config import LearnerConfig
    from learner.model import load_policy

    policy = load_policy(str(tiny_model), LearnerConfig(compute_dtype="float32"), seed=0, device="cpu")
    four_bit = [m for m in policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
    layers = policy.config.num_hidden_layers
    assert len(four_bit) == 7 * layers
    assert all(m.weight.quant_state.quant_type == "nf4" for m in four_bit)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_cached_prompt_ids_are_the_tokenizers_own(tiny_model: Path, tmp_path: Path) -> None:
    """What the driver does on a second run (ids read back, no tokenizer) gives exactly what the
    tokenizer gives (ints through JSON: byte identity holds), for both of the demo's splits."""
    from transformers import AutoTokenizer

    from cluster.data.encoding import CachedEncoder

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    never: list[str] = []
    for which in ("train", "eval"):
        fresh = load_split(cfg.data, which, 0, tokenizer)
        load_split(cfg.data, which, 0, CachedEncoder(str(tiny_model), tmp_path, lambda: tokenizer))
        reader = CachedEncoder(str(tiny_model), tmp_path, lambda: never.append("loaded"))
        cached = load_split(cfg.data, which, 0, reader)
        assert reader.hits == 1 and never == [] and cached == fresh
        assert reader.pad_id == (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
