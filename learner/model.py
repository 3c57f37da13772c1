"""Load the policy: a frozen 4-bit NF4 base (bitsandbytes) with a trainable PEFT LoRA adapter on top."""

from __future__ import annotations

from typing import Any

from grpo_ray.spans import Spans, imports_without_gc
from learner.config import LearnerConfig

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, DTYPES[name])


def load_policy(model: str, cfg: LearnerConfig, seed: int, device: str, spans: Spans | None = None) -> Any:
    """The PEFT model; the adapter is initialised from `seed`, everything else is frozen.

    The base loads through `from_pretrained`, the same call whether `model` is a hub id or a directory.
    `spans`, when given, gets the start-up phases (imports, load + 4-bit quantization, LoRA).
    """
    spans = spans if spans is not None else Spans()
    with spans.span("import transformers + peft"), imports_without_gc():
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch_dtype(cfg.compute_dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": device}
    if cfg.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
    with spans.span("load + quantize" if cfg.quantization == "nf4" else "load"):
        base = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    _keep_4bit_layout(base)
    base.config.use_cache = False
    for param in base.parameters():
        param.requires_grad_(False)
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    torch.manual_seed(seed)
    lora = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,  # type: ignore[arg-type]  # PEFT annotates int; a float alpha works
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.module_names(),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with spans.span("add LoRA"):
        policy = get_peft_model(base, lora)
    for name, param in policy.named_parameters():
        if param.requires_grad:
            # fp32 adapter even with a bf16 base: an AdamW step of ~1e-5 on bf16 weights of ~1e-2 is
            # below bf16's resolution there (~6e-5) and would round away. PEFT casts the input per layer.
            param.data = param.data.float()
            assert "lora_" in name, f"only LoRA parameters may train, found trainable '{name}'"
    return policy


def _keep_4bit_layout(model: Any) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its CPU bf16 kernel on the first eval forward.

    Seen with bitsandbytes 0.50.2 on an AVX512-bf16 CPU: after one `eval()` + `no_grad` forward the
    weights are repacked in place; that forward computes in bf16 (logits off by ~5e-3 from the
    dequantized matmul), and `dequantize_4bit` on the repacked data returns wrong weights (off by
    ~0.2), which would silently corrupt every merged export. The learner's forward must equal
    dequant(W) @ x exactly, so the repack is turned off.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_adapter_weights(policy: Any, tensors: dict[str, Any]) -> None:
    """Put saved adapter weights into the policy; a name or shape that does not match is an error."""
    from peft import set_peft_model_state_dict

    device = next(policy.parameters()).device
    dtype = torch_dtype_of_lora(policy)
    result = set_peft_model_state_dict(policy, {k: v.to(device, dtype) for k, v in tensors.items()})
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in getattr(result, "missing_keys", []) or [] if "lora_" in k]
    if unexpected or missing:
        raise ValueError(
            f"adapter does not match this model's LoRA layout (rank / target modules): "
            f"unexpected {unexpected[:3]}, missing {missing[:3]}"
        )


def torch_dtype_of_lora(policy: Any) -> Any:
    return next(p.dtype for n, p in policy.named_parameters() if "lora_" in n)
