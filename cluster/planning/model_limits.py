"""Limits the model and the engine enforce that are knowable from the model's config.json.

`grpo-ray check` and `train` (before any actor starts) refuse a config that breaks one of them, naming
both numbers, instead of vLLM's validation error inside an ActorDiedError minutes later. Reading
config.json is cheap: a local directory's file, or the Hugging Face cache / hub for a hub id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.config import ConfigError, RunConfig, resolve_project_path
from cluster.planning.shapes import ModelShapeError, hub_config_path

# rope_parameters / rope_scaling types whose `factor` stretches the context past max_position_embeddings
# (vLLM's `_get_and_verify_max_len` multiplies by it for these; 'default' and 'mrope' keep it as is).
_STRETCHING_ROPE = {"linear", "dynamic", "yarn", "longrope", "su", "llama3"}


def read_model_config(cfg: RunConfig, required: bool = False) -> dict[str, Any] | None:
    """The model's config.json as a dict (a multimodal wrapper's `text_config`), or None if unreadable.

    A local directory is read directly; a hub id through `huggingface_hub` (cache first, then the hub).
    None means "cannot know here" (offline, gated): `grpo-ray check` still prints its plan. With
    `required` (a run, which loads the model) that is a ConfigError saying how to fetch the model.
    """
    local = resolve_project_path(cfg.model)
    path: Path | None = local / "config.json" if local.is_dir() else None
    if path is None:
        try:
            path = hub_config_path(cfg.model)
        except ModelShapeError:  # offline and not cached, no such repo, gated
            if required:  # else the tokenizer's load fails first, as a library traceback
                raise ConfigError(
                    f"model '{cfg.model}' is not a local directory, not in the Hugging Face cache, and "
                    "the hub did not answer (offline, no such repo, or gated). Download it once where "
                    f"the hub is reachable (huggingface-cli download {cfg.model}), or set model: to a "
                    "local model directory"
                ) from None
            return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"model '{cfg.model}': cannot read {path} ({err}); is it a model directory?"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"model '{cfg.model}': {path} does not hold a JSON object")
    if "max_position_embeddings" not in data and isinstance(data.get("text_config"), dict):
        data = data["text_config"]
    return data


def context_limit(model_config: dict[str, Any]) -> int | None:
    """Longest sequence the model supports: max_position_embeddings, times a stretching rope factor."""
    base = model_config.get("max_position_embeddings")
    if not isinstance(base, int) or isinstance(base, bool) or base <= 0:
        return None
    rope = model_config.get("rope_scaling") or model_config.get("rope_parameters") or {}
    factor = rope.get("factor") if isinstance(rope, dict) else None
    kind = (rope.get("rope_type") or rope.get("type")) if isinstance(rope, dict) else None
    if kind in _STRETCHING_ROPE and isinstance(factor, (int, float)) and factor > 1:
        return int(base * factor)
    return base


def model_limit_problems(cfg: RunConfig, model_config: dict[str, Any]) -> list[str]:
    """Each way `cfg` breaks a limit of this model, as a sentence naming both numbers and the fix."""
    problems = []
    limit = context_limit(model_config)
    if limit is not None and cfg.rollout.max_model_len > limit:
        problems.append(
            f"rollout.max_model_len = {cfg.rollout.max_model_len} exceeds the model's context length "
            f"{limit} (max_position_embeddings in its config.json); set rollout.max_model_len <= {limit}"
        )
    heads = model_config.get("num_attention_heads")
    tp = cfg.rollout.tensor_parallel_size
    if isinstance(heads, int) and heads > 0 and heads % tp:
        problems.append(
            f"rollout.tensor_parallel_size = {tp} does not divide the model's {heads} attention heads; "
            f"pick a divisor of {heads}"
        )
    vocab = model_config.get("vocab_size")
    top_k = cfg.rollout.sampling.top_k
    if isinstance(vocab, int) and vocab > 0 and top_k > vocab:
        problems.append(
            f"rollout.sampling.top_k = {top_k} exceeds the model's vocabulary of {vocab} tokens; "
            "use -1 to disable top-k"
        )
    return problems


def check_model_limits(cfg: RunConfig, required: bool = False) -> dict[str, Any] | None:
    """Raise ConfigError listing every broken model limit; returns the config.json read (None: unknown).

    `required`: a model whose config.json cannot be read is a ConfigError too (see read_model_config).
    """
    model_config = read_model_config(cfg, required)
    if model_config is None:
        return None
    problems = model_limit_problems(cfg, model_config)
    if problems:
        raise ConfigError(f"model '{cfg.model}' cannot run this config:\n  " + "\n  ".join(problems))
    return model_config
