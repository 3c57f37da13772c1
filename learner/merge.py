"""Build what the rollout engine runs: W = dequant(W_nf4) + (alpha/r)·B·A, layer by layer.

The 4-bit tensors are never touched (merging into them is lossy and irreversible); merged weights
are built in the rollout dtype under the checkpoint's parameter names, which vLLM's loader maps
onto its fused modules. Pure functions over a PEFT model, tested against PEFT's own merge.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from grpo_ray import merge_math
from grpo_ray.weight_names import fused_siblings

_PEFT_PREFIX = "base_model.model."


def checkpoint_module_name(peft_module_name: str) -> str:
    """`base_model.model.model.layers.0.mlp.up_proj` -> `model.layers.0.mlp.up_proj`."""
    name = peft_module_name.removeprefix(_PEFT_PREFIX)
    return name.replace(".base_layer", "")


def dense_weight(linear: Any) -> torch.Tensor:
    """A linear layer's weight as a dense float32 tensor, dequantizing a bitsandbytes 4-bit layer."""
    weight = linear.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        _check_4bit_layout(quant_state)
        return merge_math.base_float32(weight.data, quant_state)
    return merge_math.base_float32(weight)


def _check_4bit_layout(quant_state: Any) -> None:
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise RuntimeError(
            "4-bit weights were repacked for bitsandbytes' CPU kernel and can no longer be "
            "dequantized exactly; load the policy with learner.model.load_policy, which prevents it"
        )


def lora_factors(lora_layer: Any, adapter: str = "default") -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A [r, in], B [out, r], scaling alpha/r) of one adapted layer, as the learner holds them."""
    return (
        lora_layer.lora_A[adapter].weight.detach(),
        lora_layer.lora_B[adapter].weight.detach(),
        float(lora_layer.scaling[adapter]),
    )


def _is_lora_layer(module: torch.nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def has_adapter(module: Any) -> bool:
    """A LoRA-wrapped layer holding the policy's ("default") adapter."""
    return _is_lora_layer(module) and "default" in module.lora_A


def _is_quantized_linear(module: torch.nn.Module) -> bool:
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None


def adapted_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Checkpoint module name -> LoRA-wrapped layer."""
    return {checkpoint_module_name(n): m for n, m in model.named_modules() if _is_lora_layer(m)}


def quantized_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Checkpoint module name -> 4-bit base layer (whether or not an adapter wraps it)."""
    return {
        checkpoint_module_name(n): m
        for n, m in model.named_modules()
        if _is_quantized_linear(m) and not _is_lora_layer(m)
    }


def modules_to_send(model: torch.nn.Module, packed: Mapping[str, list[str]], include_base: bool) -> list[str]:
    """Checkpoint modules a sync must carry, closed under the engine's fusion.

    A fused engine module (qkv_proj) reloads from all its parts at once; sending q_proj alone
    would leave k and v unset. `include_base` adds every 4-bit layer, so the engine runs the
    dequantized base rather than the original full-precision weights.
    """
    wanted = set(adapted_modules(model))
    if include_base:
        wanted |= set(quantized_modules(model))
    closed = {sibling for name in wanted for sibling in fused_siblings(name, packed)}
    return sorted(closed, key=_layer_order)


def _layer_order(name: str) -> tuple[int, str]:
    # Send layer by layer: vLLM's layerwise reload processes a module once all its parts arrived.
    parts = name.split(".")
    layer = next((int(p) for p in parts if p.isdigit()), -1)
    return layer, name


def _checkpoint_modules(model: torch.nn.Module) -> dict[str, Any]:
    by_checkpoint: dict[str, Any] = {}
    for peft_name, candidate in model.named_modules():
        # A LoRA wrapper and its base_layer share a checkpoint name; the wrapper comes first and wins.
        by_checkpoint.setdefault(checkpoint_module_name(peft_name), candidate)
    return by_checkpoint


def _base_of(module: Any) -> Any:
    return module.base_layer if _is_lora_layer(module) else module


def parameter_names(model: torch.nn.Module, module_names: list[str]) -> list[str]:
    """The checkpoint parameter names `merged_weights` yields for these modules, without building them."""
    modules = _checkpoint_modules(model)
    names = []
    for name in module_names:
        names.append(f"{name}.weight")
        if getattr(_base_of(modules[name]), "bias", None) is not None:
            names.append(f"{name}.bias")
    return names


def merged_weights(
    model: torch.nn.Module, module_names: list[str], dtype: torch.dtype, with_lora: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint parameter name, merged tensor in `dtype`) for each module, weight then bias."""
    by_checkpoint = _checkpoint_modules(model)
    for name in module_names:
        module = by_checkpoint.get(name)
        if module is None:
            raise KeyError(f"module '{name}' is not in the learner's model")
        base = _base_of(module)
        with torch.no_grad():
            # dense_weight checks the 4-bit layout; merge_math.merged_weight is the shared arithmetic.
            dense = dense_weight(base)
            lora = lora_factors(module) if with_lora and has_adapter(module) else None
            yield f"{name}.weight", merge_math.merged_weight(dense, None, lora, dtype)
            if getattr(base, "bias", None) is not None:
                yield f"{name}.bias", merge_math.engine_bias(base.bias, dtype)


def base_tensors(model: torch.nn.Module, module_names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The base layers as the learner stores them, for a worker that merges itself (worker_merge).

    A 4-bit layer: `{name}.weight` = the packed uint8 NF4 codes plus bitsandbytes' packed
    quantization state (grpo_ray.merge_math.pack_quant_state); a dense layer: its weight in the
    learner's dtype. Then `{name}.bias` when there is one. Host copies: they go to the object store.
    """
    by_checkpoint = _checkpoint_modules(model)
    for name in module_names:
        base = _base_of(by_checkpoint[name])
        weight = base.weight
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is not None:
            _check_4bit_layout(quant_state)  # repacked codes would not dequantize as the learner's do
            yield f"{name}.weight", weight.data.cpu()
            yield from ((k, v.cpu()) for k, v in merge_math.pack_quant_state(f"{name}.weight", quant_state))
        else:
            yield f"{name}.weight", weight.detach().cpu()
        if getattr(base, "bias", None) is not None:
            yield f"{name}.bias", base.bias.detach().cpu()


def lora_tensors(
    model: torch.nn.Module, module_names: list[str]
) -> tuple[list[tuple[str, torch.Tensor]], dict[str, float]]:
    """Absolute `{name}.lora_A`, `{name}.lora_B` (float32, host) of every adapted module among
    `module_names`, and each one's scaling alpha / r."""
    by_checkpoint = _checkpoint_modules(model)
    tensors: list[tuple[str, torch.Tensor]] = []
    scaling: dict[str, float] = {}
    for name in module_names:
        module = by_checkpoint[name]
        if not has_adapter(module):
            continue
        lora_a, lora_b, scale = lora_factors(module)
        tensors += [(f"{name}.lora_A", lora_a.float().cpu()), (f"{name}.lora_B", lora_b.float().cpu())]
        scaling[name] = scale
    return tensors, scaling
