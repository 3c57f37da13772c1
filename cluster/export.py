"""`grpo-ray export --merged`: the trained policy as an ordinary model directory.

Weights: every 4-bit layer dequantized with the adapter merged in (what the rollout engines ran),
every other parameter from the checkpoint, all in one dtype. transformers and vLLM load it like
any model; the tokenizer and generation config are copied along.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from cluster.config import ConfigError, RunConfig, resolve_project_path


def export_merged(cfg: RunConfig, adapter_dir: Path, out: Path, dtype: str) -> Path:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from learner.merge import adapted_modules, merged_weights, quantized_modules
    from learner.model import load_adapter_weights, load_policy, torch_dtype

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.exists():
        raise ConfigError(f"no adapter weights at {weights}")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"export target '{out}' is not empty; pick a new directory")
    local = resolve_project_path(cfg.model)
    model = str(local) if local.exists() else cfg.model
    policy = load_policy(model, cfg.learner, seed=cfg.seed, device="cpu")
    load_adapter_weights(policy, load_file(str(weights)))
    target_dtype = torch_dtype(dtype)
    modules = sorted(set(adapted_modules(policy)) | set(quantized_modules(policy)))
    merged = dict(merged_weights(policy, modules, target_dtype))
    del policy

    dense = AutoModelForCausalLM.from_pretrained(model, dtype=target_dtype)
    state = dense.state_dict()
    unknown = sorted(set(merged) - set(state))
    if unknown:
        raise RuntimeError(f"merged weights name parameters the base model lacks: {unknown[:5]}")
    with torch.no_grad():
        for name, tensor in merged.items():
            state[name].copy_(tensor)
    out.mkdir(parents=True, exist_ok=True)
    dense.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(model).save_pretrained(str(out))
    with contextlib.suppress(OSError):  # no generation_config.json: the model config's defaults apply
        GenerationConfig.from_pretrained(model).save_pretrained(str(out))
    return out
