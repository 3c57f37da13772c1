"""sync: worker_merge: what a worker rebuilds from the packed base + LoRA A/B IS the learner's merged export.

Real bitsandbytes NF4 + PEFT on the shipped tiny model; the updates cross a pickle round trip (the
numpy wire format Ray uses) before the worker side sees them. No Ray or vLLM: the exactness of the
rebuild does not depend on them (tests/integration/test_grpo_loop.py runs the mode end to end).

Byte identity is the right check here, not a tolerance: both sides run the same functions
(grpo_ray/merge_math.py: bitsandbytes' dequantize_4bit, one addmm, one cast) on the same inputs with
the same kernels on the same machine, so every bit must agree. A different device type (a CUDA
learner, a CPU worker) is out of scope: GEMM kernels differ there.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from grpo_ray.checksum import weights_checksum
from grpo_ray.records import WeightUpdate
from learner.config import LearnerConfig
from learner.learner import Learner
from rollout.worker_merge import WorkerMerge, WorkerMergeError

pytestmark = pytest.mark.integration


def _learner(model: Path, packed: dict[str, list[str]], rollout_dtype: str, **learner: Any) -> Learner:
    cfg = LearnerConfig(
        compute_dtype="float32", lora={"rank": 8, "alpha": 16, **learner.pop("lora", {})}, **learner
    )
    out = Learner(str(model), cfg, seed=0, temperature=1.0, rollout_dtype=rollout_dtype, pad_id=0)
    out.weight_names(packed)  # remembers the engine's fusion map, as the driver's start does
    return out


def _take_a_step(learner: Learner, seed: int) -> None:
    """New absolute LoRA values and a version bump: what a train step leaves behind."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in learner.policy.named_parameters():
            if "lora_" in name:  # B starts at 0; random values make the delta non-trivial
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    learner.version += 1


def _wire(update: WeightUpdate) -> WeightUpdate:
    return pickle.loads(pickle.dumps(update, protocol=5))


def _assert_identical(ours: list[tuple[str, torch.Tensor]], theirs: list[tuple[str, torch.Tensor]]) -> None:
    assert [n for n, _ in ours] == [n for n, _ in theirs]
    for (name, a), (_, b) in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (
            f"{name} differs from the learner's merge"
        )
    assert weights_checksum(ours) == weights_checksum(theirs)


CASES = [
    pytest.param("float32", {"quantization": "nf4"}, id="nf4-all-linear-fp32"),
    pytest.param("bfloat16", {"quantization": "nf4"}, id="nf4-all-linear-bf16"),
    pytest.param("float32", {"quantization": "nf4", "double_quant": False}, id="nf4-no-double-quant"),
    # q and v adapted, k not: the fused qkv_proj closure makes the worker keep and resend k's base too
    pytest.param(
        "float32", {"quantization": "nf4", "lora": {"target_modules": ["q_proj", "v_proj"]}}, id="nf4-qv"
    ),
    pytest.param("float32", {"quantization": "none"}, id="plain-lora"),
]


@pytest.mark.parametrize(("rollout_dtype", "settings"), CASES)
def test_worker_rebuild_equals_learner_merged_export(
    tiny_model: Path, qwen2_packed: dict[str, list[str]], rollout_dtype: str, settings: dict[str, Any]
) -> None:
    learner = _learner(tiny_model, qwen2_packed, rollout_dtype, **settings)
    worker = WorkerMerge(store="cpu", compute="cpu", dtype=getattr(torch, rollout_dtype))
    _take_a_step(learner, seed=1)

    # First sync: the packed base (+ LoRA); the engine gets every base layer, merged where adapted.
    first = _wire(learner.export("worker_merge", include_base=True))
    assert first.base_weights and first.checksum == weights_checksum(first.tensors)
    if settings["quantization"] == "nf4":
        codes = [t for n, t in first.tensors if n.endswith(".weight") and t.dtype == torch.uint8]
        assert len(codes) == 7 * 3, "every decoder linear travels as packed uint8 NF4 codes"
    first.full_check = True
    _assert_identical(list(worker.merged(first)), learner.export("merged", include_base=True).tensors)
    assert worker.last_checksum == learner.merged_checksum()

    # Later syncs: LoRA A/B only; every adapted module (and its fused siblings) rebuilt exactly.
    for seed in (2, 3):
        _take_a_step(learner, seed)
        update = _wire(learner.export("worker_merge", include_base=False))
        assert not update.base_weights and all(".lora_" in n for n, _ in update.tensors)
        merged = learner.export("merged", include_base=False)
        assert update.merge_modules == list(dict.fromkeys(n.rsplit(".", 1)[0] for n, _ in merged.tensors))
        update.full_check = True
        _assert_identical(list(worker.merged(update)), merged.tensors)
        assert worker.last_checksum == learner.merged_checksum() == merged.checksum


def test_skipped_version_and_missing_base(tiny_model: Path, qwen2_packed: dict[str, list[str]]) -> None:
    learner = _learner(tiny_model, qwen2_packed, "float32", quantization="nf4")
    fresh = WorkerMerge(store="cpu", compute="cpu", dtype=torch.float32)
    lora_only = _wire(learner.export("worker_merge", include_base=False))
    with pytest.raises(WorkerMergeError, match="holds no base yet"):
        fresh.merged(lora_only)  # a restarted worker must get the base again; raised before any load

    worker = WorkerMerge(store="cpu", compute="cpu", dtype=torch.float32)
    list(worker.merged(_wire(learner.export("worker_merge", include_base=True))))
    _take_a_step(learner, seed=4)
    _take_a_step(learner, seed=5)  # v1 is never applied: A/B are absolute, so v2 alone is exact
    skipped_to = _wire(learner.export("worker_merge", include_base=False))
    assert skipped_to.version == 2
    _assert_identical(list(worker.merged(skipped_to)), learner.export("merged").tensors)
    assert worker.base_bytes() > 0


@pytest.mark.parametrize("mode", ["merged", "adapter", "worker_merge"])
def test_planned_sync_bytes_match_the_exports(
    tiny_model: Path, qwen2_packed: dict[str, list[str]], mode: str
) -> None:
    """cluster/planning/sync_bytes.py (what `grpo-ray check` and the 7B rows in results.md compute)
    against the bytes the learner really exports, on the demo config."""
    from cluster.config import load_config
    from cluster.planning.memory import ModelShape
    from cluster.planning.sync_bytes import sync_bytes
    from tests.conftest import DEMO_CONFIG

    cfg = load_config(DEMO_CONFIG)
    learner = Learner(str(tiny_model), cfg.learner, 0, 1.0, cfg.rollout.dtype, pad_id=0)
    learner.weight_names(qwen2_packed)
    planned = sync_bytes(cfg, ModelShape.from_pretrained(str(tiny_model)), mode)
    kinds = {"merged": [("merged", True)], "adapter": [("base", True), ("adapter", False)]}
    first = sum(learner.export(k, b).num_bytes for k, b in kinds.get(mode, [(mode, True)]))
    per_step = learner.export("adapter" if mode == "adapter" else mode, False).num_bytes
    assert per_step == planned.per_step
    # Left out of the plan: each 4-bit linear's constants (16-entry code, 256-entry nested code, the
    # packed non-tensor fields): about 1.2 KiB each, 21 linears here.
    extra = first - planned.first
    assert 0 <= extra <= (21 * 1300 if mode == "worker_merge" else 0), extra
