"""Shared fixtures: the shipped tiny model, one local Ray for the whole session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "assets" / "tiny-qwen2"
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
QWEN2_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "GRPO_RAY_CACHE_DIR" not in os.environ:
    # One prompt-token cache for the session's runs, never the user's ~/.cache: the first run that
    # loads a data set encodes it, later ones read it back, as a user's second run would.
    _token_cache = tempfile.mkdtemp(prefix="grpo-ray-test-cache-")
    os.environ["GRPO_RAY_CACHE_DIR"] = _token_cache
    atexit.register(shutil.rmtree, _token_cache, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    assert (TINY_MODEL / "config.json").exists(), "run scripts/build_tiny_model.py to build the shipped model"
    return TINY_MODEL


@pytest.fixture(scope="session")
def qwen2_packed() -> dict[str, list[str]]:
    """vLLM's fusion map for Qwen2 (the integration test reads the real one from the engine)."""
    return QWEN2_PACKED


@pytest.fixture(scope="session")
def ray_session() -> Iterator[list[str]]:
    """A simulated two-node Ray cluster on this machine, shared by every test that needs Ray.

    Two raylets with 2 logical CPUs each, so placement really chooses between nodes. Stopped by its
    own handle at the end (never by killing processes by name). Yields the node ids.
    """
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    yield [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    ray.shutdown()
    cluster.shutdown()
