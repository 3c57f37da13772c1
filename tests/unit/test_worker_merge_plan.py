"""sync: worker_merge outside the engines: the driver's full check, the memory planner's packed base,
the sync-bytes arithmetic and `grpo-ray check`'s recommendation. Expected figures worked out below.

Qwen2.5-7B: h=3584 i=18944 28 layers 28 heads 4 kv (q_dim 3584, kv_dim 512), vocab 152064.
Per layer: q 3584*3584 = 12,845,056; k, v 3584*512 = 1,835,008 each; o 12,845,056;
gate, up, down 3584*18944 = 67,895,296 each; sum 233,046,016; x 28 layers = 6,525,288,448.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import cluster.policy_sync as policy_sync
from cluster.config import load_config
from cluster.planning.memory import (
    QWEN25_SHAPES,
    inputs_from_config,
    nf4_tensor_bytes,
    nf4_weight_bytes,
    plan_memory,
)
from cluster.planning.sync_bytes import sync_bytes, worker_merge_advice
from cluster.rollout_pool import SyncError
from grpo_ray.records import SyncAck

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_7B = ROOT / "configs" / "gsm8k_qwen2.5-7b_cluster.yaml"
Q7 = QWEN25_SHAPES["Qwen2.5-7B"]


class _Learner:
    def __init__(self, merged_checksum: str | None) -> None:
        self.merged_checksum = merged_checksum
        self.calls: list[tuple[Any, ...]] = []

    def export_for_sync(self, kind: str, include_base: bool, every: int, final: int) -> tuple[str, Any]:
        self.calls.append((kind, include_base, every, final))
        return "update-ref", (3, "payload", self.merged_checksum)


class _Pool:
    def __init__(self, rebuilt: list[str | None]) -> None:
        self.rebuilt = rebuilt

    def sync(
        self, update_ref: str, version: int, checksum: str, slots: list[int] | None = None
    ) -> list[SyncAck]:
        return [SyncAck(i, version, checksum, 0.1, merged_checksum=m) for i, m in enumerate(self.rebuilt)]


def _cfg(*overrides: str) -> Any:
    return load_config(ROOT / "configs" / "demo.yaml", ["sync=worker_merge", *overrides])


def test_driver_sync_names_the_worker_whose_rebuild_drifted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy_sync, "_get", lambda ref: ref)  # the fakes hand back values, not object refs
    learner = _Learner("learner-merge")
    cfg = _cfg("sync_check_every=5", "steps=7")
    version, acks = policy_sync.sync(
        cfg, learner, _Pool(["learner-merge", "learner-merge"]), include_base=False
    )
    assert version == 3 and len(acks) == 2
    assert learner.calls == [("worker_merge", False, 5, 7)]  # one export, the schedule from the config
    with pytest.raises(SyncError, match="rollout worker 1 rebuilt policy v3"):
        policy_sync.sync(cfg, learner, _Pool(["learner-merge", "drifted"]), include_base=False)
    # Not a check sync (the learner sent no merged checksum): the acks' rebuilt checksums are not compared.
    policy_sync.sync(cfg, _Learner(None), _Pool([None, None]), include_base=False)


def test_planner_counts_the_packed_base_next_to_the_engine() -> None:
    cfg = load_config(CLUSTER_7B, ["sync=worker_merge"])
    on_device = plan_memory(inputs_from_config(cfg, Q7, device_gib=80))
    # all-linear: the worker keeps every decoder linear's NF4 base (as the learner holds it) + q/k/v
    # biases in bf16: 28 * (3584 + 2*512) * 2 = 258,048 bytes
    assert on_device.rollout["packed_base"] == nf4_weight_bytes(Q7, double_quant=True) + 258_048
    assert on_device.rollout["packed_base"] == on_device.learner["nf4_weights"] + 258_048
    merged = plan_memory(inputs_from_config(load_config(CLUSTER_7B), Q7, device_gib=80))
    assert on_device.rollout_total - merged.rollout_total == on_device.rollout["packed_base"]
    assert on_device.gpu_memory_utilization == merged.gpu_memory_utilization  # outside vLLM's fraction
    assert "packed base (worker)" in on_device.render() and "packed base" not in merged.render()
    host = load_config(CLUSTER_7B, ["sync=worker_merge", "rollout.worker_merge_base=host"])
    assert plan_memory(inputs_from_config(host, Q7, device_gib=80)).rollout["packed_base"] == 0
    # attention only: q, k, v, o are kept (13% of the decoder linears) + the q/k/v biases
    attention = load_config(CLUSTER_7B, ["sync=worker_merge", "learner.lora.target_modules=attention"])
    q, kv = nf4_tensor_bytes(3584 * 3584, True), nf4_tensor_bytes(3584 * 512, True)
    kept = plan_memory(inputs_from_config(attention, Q7, device_gib=80)).rollout["packed_base"]
    assert kept == 28 * (2 * q + 2 * kv) + 258_048


def test_sync_bytes_of_the_7b_cluster_config() -> None:
    cfg = load_config(CLUSTER_7B)
    # merged: all-linear in bf16 + q/k/v biases: (6,525,288,448 + 28*4608) * 2 bytes
    merged = sync_bytes(cfg, Q7, "merged")
    assert merged.per_step == merged.first == (6_525_288_448 + 28 * 4608) * 2 == 13_050_834_944
    # LoRA r=64 all-linear: 28 * 64 * sum(in + out) = 28 * 64 * 90,112 params, fp32
    lora = 28 * 64 * (2 * 7168 + 2 * 4096 + 3 * 22528) * 4
    assert sync_bytes(cfg, Q7, "worker_merge").per_step == sync_bytes(cfg, Q7, "adapter").per_step == lora
    assert sync_bytes(cfg, Q7, "worker_merge").first == nf4_weight_bytes(Q7, True) + 28 * 4608 * 2 + lora


def test_check_recommends_worker_merge_for_split_placement_only() -> None:
    line = worker_merge_advice(load_config(CLUSTER_7B), Q7)
    assert line is not None and line.startswith("sync: consider worker_merge (merged now)")
    assert "645.9 MB of LoRA per sync instead of 13,050.8 MB" in line
    assert worker_merge_advice(load_config(CLUSTER_7B, ["sync=worker_merge"]), Q7) is None
    colocated = load_config(ROOT / "configs" / "demo.yaml", ["placement=colocate", "rollout.num_workers=1"])
    assert (
        worker_merge_advice(colocated, Q7) is None
    )  # one engine next to the learner: nothing crosses a network
    assert "slower LoRA path" in (worker_merge_advice(load_config(CLUSTER_7B, ["sync=adapter"]), Q7) or "")
