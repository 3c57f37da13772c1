"""Exports other tools load: the adapter (PeftModel, vLLM LoRA) and the merged model (transformers, vLLM).

The merged export must reproduce the training policy: the learner's 4-bit model with the adapter.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bounds import assert_greedy_agrees, forward_atol, greedy_reference, max_gap, within

from cluster.config import load_config
from cluster.export import export_merged
from learner.config import LearnerConfig
from learner.model import load_policy

pytestmark = pytest.mark.integration

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]


@pytest.fixture(scope="module")
def trained_adapter(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> tuple[Path, torch.nn.Module]:
    """An adapter with non-zero B (as after training), saved the way the learner saves it."""
    cfg = load_config(DEMO)
    policy = load_policy(str(tiny_model), cfg.learner, seed=0, device="cpu")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    directory = tmp_path_factory.mktemp("adapter")
    policy.save_pretrained(str(directory))
    policy.train()  # the learner's mode: no CPU repack of the 4-bit weights
    return directory, policy


def _policy_logits(policy: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return policy(input_ids=torch.tensor([prompt])).logits[0]


def test_adapter_loads_with_peft(trained_adapter: tuple[Path, torch.nn.Module], tiny_model: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    directory, policy = trained_adapter
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model)), str(directory))
    ours = {n: p for n, p in policy.named_parameters() if "lora_" in n}
    theirs = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert ours.keys() == theirs.keys() and ours
    for name in ours:  # saved and loaded bytes, no arithmetic: bit for bit
        assert torch.equal(ours[name].float(), theirs[name].float()), name


@pytest.mark.numeric
def test_merged_export_matches_training_policy(
    trained_adapter: tuple[Path, torch.nn.Module], tmp_path: Path, ray_session: list[str]
) -> None:
    import ray
    from transformers import AutoModelForCausalLM

    from cluster.placement import worker_env
    from rollout.worker import RolloutWorker

    directory, policy = trained_adapter
    cfg = load_config(DEMO)
    out = export_merged(cfg, directory, tmp_path / "merged", "float32")

    # transformers: an ordinary model whose logits are the training policy's
    dense = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    for prompt in PROMPTS:
        with torch.no_grad():
            got = dense(input_ids=torch.tensor([prompt])).logits[0]
        expected = _policy_logits(policy, prompt)
        # x·W + s·(x·A)·B (the 4-bit policy) against x·(W + s·B·A): one float32 function, another order
        within(
            "merged export vs policy logits",
            max_gap(got, expected),
            forward_atol(float(expected.abs().max())),
        )

    # vLLM loads the directory as an ordinary model and decodes as the (policy-equal) dense model does
    worker = (
        ray.remote(RolloutWorker)
        .options(num_cpus=0.5, runtime_env={"env_vars": worker_env(cfg)})
        .remote(0, str(out), cfg.rollout, 0, None)
    )
    try:
        groups = ray.get(worker.generate.remote(list(enumerate(PROMPTS)), 1, None, True))
    finally:
        ray.kill(worker)
    for prompt, group in zip(PROMPTS, groups, strict=True):
        # vLLM's float32 kernels vs torch's: the same tokens except past a near-tie (the forward model)
        expected, margins, scale = greedy_reference(dense, prompt, 8)
        assert_greedy_agrees(group.completions[0].token_ids, expected, margins, forward_atol(scale))


@pytest.mark.numeric
def test_adapter_serves_through_vllm_lora(
    trained_adapter: tuple[Path, torch.nn.Module], tiny_model: Path, ray_session: list[str]
) -> None:
    import json

    import ray
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from cluster.placement import worker_env
    from grpo_ray.checksum import weights_checksum
    from grpo_ray.records import WeightUpdate
    from rollout.worker import RolloutWorker

    directory, _ = trained_adapter
    cfg = load_config(DEMO)
    tensors = list(load_file(str(directory / "adapter_model.safetensors")).items())
    adapter_config = json.loads((directory / "adapter_config.json").read_text())
    update = WeightUpdate(1, "adapter", tensors, weights_checksum(tensors), adapter_config)
    worker = (
        ray.remote(RolloutWorker)
        .options(num_cpus=0.5, runtime_env={"env_vars": worker_env(cfg)})
        .remote(0, str(tiny_model), cfg.rollout, 0, LearnerConfig().lora.rank)
    )
    try:
        ack = ray.get(worker.load.remote(update))
        groups = ray.get(worker.generate.remote(list(enumerate(PROMPTS)), 1, None, True))
    finally:
        ray.kill(worker)
    assert (ack.version, ack.checksum) == (1, update.checksum)

    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model)), str(directory)
    )
    for prompt, group in zip(PROMPTS, groups, strict=True):
        # vLLM's LoRA kernels vs PEFT's: the same tokens except past a near-tie (the forward model)
        expected, margins, scale = greedy_reference(peft_model, prompt, 8)
        assert_greedy_agrees(group.completions[0].token_ids, expected, margins, forward_atol(scale))
