"""Sending the learner's policy to the rollout workers: one export into the object store, every
worker loads that copy, every ack is checked against it.

`sync` waits for the acks (the first, absolute sync; a restarted or added worker's full sync; the
synchronous loop). `send_step_update` returns once the loads are queued on the workers: each runs
after the generate calls already sent to that worker, before any sent later, and its ack is checked
when it arrives (cluster/rollout_pool.py), which is how asynchronous rollouts change policy between
generate calls.
"""

from __future__ import annotations

from typing import Any

from cluster.config import RunConfig
from cluster.handles import LearnerHandle
from cluster.rollout_pool import RolloutPool, check_merged
from grpo_ray.records import SyncAck


def sync_kinds(cfg: RunConfig, include_base: bool) -> list[tuple[str, bool]]:
    """The exports one sync consists of, as (kind, with base layers), in the order they are sent.

    merged: one; adapter with an NF4 base: the dequantized base once, then the adapter;
    worker_merge: one (packed NF4 base plus LoRA on the first sync, LoRA alone afterwards)."""
    if cfg.sync == "adapter":
        kinds = [("base", True)] if include_base and cfg.learner.quantization == "nf4" else []
        return [*kinds, ("adapter", False)]
    if cfg.sync == "worker_merge":
        return [("worker_merge", include_base)]
    return [("merged", include_base)]


def sync(
    cfg: RunConfig,
    learner: LearnerHandle,
    pool: RolloutPool,
    include_base: bool,
    slots: list[int] | None = None,
) -> tuple[int, list[SyncAck]]:
    """Export once into the object store; the workers load that copy; returns (version, acks).

    The first sync of a run also carries the base layers (dequantized, or for worker_merge packed
    NF4), so from step 0 the engines run exactly the learner's policy, never the checkpoint's
    full-precision weights. worker_merge later sends only LoRA A/B; on the first sync, every
    `sync_check_every` versions and at the last step, each worker's rebuilt weights are checked
    against the learner's own merge. `slots`: only those workers (a restarted or added one, with
    include_base); default all active ones. Raises SyncError naming a worker whose ack differs.
    """
    version, acks = -1, []
    for kind, with_base in sync_kinds(cfg, include_base):
        update_ref, summary_ref = learner.export_for_sync(kind, with_base, cfg.sync_check_every, cfg.steps)
        version, checksum, merged_checksum = _get(summary_ref)
        acks = pool.sync(update_ref, version, checksum, slots)
        for ack in acks:
            check_merged(ack, version, merged_checksum)
    return version, acks


def send_step_update(cfg: RunConfig, learner: LearnerHandle, pool: RolloutPool) -> int:
    """Export the policy after a training step and queue its load on every active worker; returns
    its version without waiting for the acks (the pool checks them as they arrive)."""
    version = -1
    for kind, with_base in sync_kinds(cfg, include_base=False):
        update_ref, summary_ref = learner.export_for_sync(kind, with_base, cfg.sync_check_every, cfg.steps)
        version, checksum, merged_checksum = _get(summary_ref)
        pool.send(update_ref, version, checksum, merged_checksum)
    return version


def full_sync(cfg: RunConfig, learner: LearnerHandle, pool: RolloutPool) -> Any:
    """What a restarted or added worker gets before it takes work: the whole policy, acknowledged."""
    return lambda slots: sync(cfg, learner, pool, include_base=True, slots=slots)[1]


def _get(ref: Any) -> Any:
    import ray

    return ray.get(ref)
