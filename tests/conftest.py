"""Shared fixtures: the shipped tiny model, one local Ray for the whole session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "assets" / "tiny-qwen2"
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
QWEN2_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    assert (TINY_MODEL / "config.json").exists(), "run scripts/build_tiny_model.py to build the shipped model"
    return TINY_MODEL


@pytest.fixture(scope="session")
def qwen2_packed() -> dict[str, list[str]]:
    """vLLM's fusion map for Qwen2 (the integration test reads the real one from the engine)."""
    return QWEN2_PACKED


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for every test that needs it, stopped by its own handle at the end."""
    import ray

    ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()
