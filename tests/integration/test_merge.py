"""Merged export == PEFT's own merge onto the dequantized NF4 base, for every target module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bounds import EPS32, forward_atol, max_gap, within

from learner.config import LearnerConfig
from learner.merge import adapted_modules, dense_weight, merged_weights, modules_to_send, quantized_modules
from learner.model import load_policy

pytestmark = pytest.mark.integration


def _trained_looking_policy(model: Path, preset: str) -> torch.nn.Module:
    cfg = LearnerConfig(compute_dtype="float32", lora={"rank": 8, "alpha": 16, "target_modules": preset})
    policy = load_policy(str(model), cfg, seed=0, device="cpu")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:  # B starts at 0; give it values so the delta is not trivially zero
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return policy


@pytest.mark.numeric
@pytest.mark.parametrize("preset", ["all-linear", "attention"])
def test_merged_equals_peft_merge_on_dequantized_base(
    tiny_model: Path, preset: str, qwen2_packed: dict[str, list[str]]
) -> None:
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    policy = _trained_looking_policy(tiny_model, preset)
    ours = dict(
        merged_weights(policy, modules_to_send(policy, qwen2_packed, include_base=True), torch.float32)
    )

    reference = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    state = reference.state_dict()
    with torch.no_grad():
        for name, module in quantized_modules(policy).items():
            state[f"{name}.weight"].copy_(dense_weight(module))
    lora = policy.peft_config["default"]
    peft_reference = get_peft_model(
        reference,
        LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, target_modules=sorted(lora.target_modules)),
    )
    set_peft_model_state_dict(peft_reference, get_peft_model_state_dict(policy))
    merged = peft_reference.merge_and_unload().state_dict()

    layers = reference.config.num_hidden_layers
    assert len([k for k in ours if k.endswith(".weight")]) == 7 * layers  # every linear layer, adapted or not
    adapted = adapted_modules(policy)
    for name, tensor in ours.items():
        module = adapted.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        if module is None:  # a bias or an unadapted layer: both sides copy the same dequantized bits
            assert torch.equal(tensor, merged[name]), name
            continue
        lora_a, lora_b = (getattr(module, f"lora_{x}")["default"].weight.detach().float() for x in "AB")
        size = dense_weight(module.base_layer).abs() + module.scaling["default"] * (
            lora_b.abs() @ lora_a.abs()
        )
        # W + s·Σ_k B_ik·A_kj over r terms: ours one addmm, PEFT's a matmul, a scale and an add; each is
        # within (r + 2)·EPS32/2 of exact relative to W's and the products' sizes (Higham's γ_{r+2}), so
        # the two within (r + 2)·EPS32·size of each other
        bound = (lora_a.shape[0] + 2) * EPS32 * size
        within(
            "merged weight gap / rounding bound", float(((tensor - merged[name]).abs() / bound).max()), 1.0
        )

    # The learner's own 4-bit forward is the merged dense model's forward (train mode: no CPU repack).
    tokens = torch.randint(
        0, reference.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2)
    )
    policy.train()
    peft_reference.eval()
    with torch.no_grad():
        got, expected = policy(input_ids=tokens).logits, peft_reference(input_ids=tokens).logits
    # x·W + s·(x·A)·B against x·(W + s·B·A): one float32 function summed in another order
    within("4-bit + LoRA vs merged logits", max_gap(got, expected), forward_atol(float(expected.abs().max())))


def test_export_after_eval_forward_is_unchanged(tiny_model: Path, qwen2_packed: dict[str, list[str]]) -> None:
    """bitsandbytes would repack 4-bit weights on an eval forward; load_policy prevents it."""
    policy = _trained_looking_policy(tiny_model, "attention")
    names = modules_to_send(policy, qwen2_packed, include_base=True)
    before = dict(merged_weights(policy, names, torch.float32))
    policy.eval()
    with torch.no_grad():
        policy(input_ids=torch.tensor([[1, 2, 3]]))
    after = dict(merged_weights(policy, names, torch.float32))
    for name in before:  # the same bytes dequantized twice in one process: bit for bit
        assert torch.equal(before[name], after[name]), name
