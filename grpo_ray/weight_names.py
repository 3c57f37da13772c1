"""Checkpoint-name <-> engine-name bookkeeping for in-place weight loads. Pure Python, unit tested."""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def engine_name(checkpoint_name: str, packed: Mapping[str, list[str]]) -> str:
    """`model.layers.0.self_attn.q_proj.weight` -> `model.layers.0.self_attn.qkv_proj.weight`."""
    module, _, param = checkpoint_name.rpartition(".")
    parent, _, leaf = module.rpartition(".")
    for fused, parts in packed.items():
        if leaf in parts:
            return f"{parent}.{fused}.{param}" if parent else f"{fused}.{param}"
    return checkpoint_name


def fused_siblings(module_name: str, packed: Mapping[str, list[str]]) -> list[str]:
    """Every checkpoint module that shares an engine module with `module_name` (itself included)."""
    parent, _, leaf = module_name.rpartition(".")
    for parts in packed.values():
        if leaf in parts:
            return [f"{parent}.{part}" if parent else part for part in parts]
    return [module_name]


def check_names(
    checkpoint_names: Iterable[str], engine_parameters: Iterable[str], packed: Mapping[str, list[str]]
) -> list[str]:
    """Problems (empty when fine): checkpoint names the engine has no parameter for."""
    known = set(engine_parameters)
    return [
        f"'{name}' maps to engine parameter '{engine_name(name, packed)}', which the engine does not have"
        for name in checkpoint_names
        if engine_name(name, packed) not in known
    ]
