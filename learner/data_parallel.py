"""Data-parallel learning: N Learner actors (ranks) train one policy with DeepSpeed, driven from here.

`LearnerGroup` lives in the driver (it is not an actor). It offers, as plain blocking calls, the verbs
the driver uses on a single Learner actor; with one rank it only forwards them, so a one-rank group
trains exactly as the Learner alone.

A step: advantages (per whole group) and the loss normaliser (whole batch) are computed here, then
the sequences are dealt to the ranks (`split_batch`); each rank's loss is its share of the batch loss
over the global normaliser, so the batch gradient is the sum over ranks, which learner/zero.py
arranges under DeepSpeed's averaging. Every rank ends the step with the same adapter.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

from grpo_ray.records import Batch, Shard
from learner.config import LearnerConfig
from learner.grpo import combine_metrics
from learner.learner import batch_targets

# Metrics every rank reports with the same value (the step is global), and those this file recomputes.
_GLOBAL_KEYS = ("train/grad_norm", "train/lr")
_OWN_KEYS = ("train/advantage_abs_mean", "train/seconds", "sync/logprob_gap_mean", "sync/logprob_gap_max")


def split_batch(batch: Batch, world_size: int, cfg: LearnerConfig) -> list[Shard]:
    """One Shard per rank. Sequences are dealt longest first, round robin, so ranks get about equal
    tokens and sequence counts differing by at most one; all ranks run the same number of
    micro-batches (the most any rank needs)."""
    advantages_B, valid_B, normaliser = batch_targets(batch, cfg.loss)
    rows = [(p, c) for p, g in enumerate(batch.groups) for c in g.completions]  # (group index, completion)
    sizes = [len(batch.groups[p].prompt_token_ids) + len(c.token_ids) for p, c in rows]
    order = sorted(range(len(rows)), key=lambda i: -sizes[i])
    dealt = [sorted(order[rank::world_size]) for rank in range(world_size)]
    micro_batches = max(1, max(math.ceil(len(d) / cfg.micro_batch_size) for d in dealt))
    shards = []
    for indices in dealt:
        groups = [
            dataclasses.replace(batch.groups[p], completions=[rows[i][1] for i in members])
            for p, members in ((p, list(m)) for p, m in itertools.groupby(indices, lambda i: rows[i][0]))
        ]
        shards.append(
            Shard(
                groups=groups,
                advantages=[float(advantages_B[i]) for i in indices],
                valid=[bool(valid_B[i]) for i in indices],
                normaliser=normaliser,
                micro_batches=micro_batches,
            )
        )
    return shards


def merge_metrics(per_rank: list[dict[str, float]], shards: list[Shard]) -> dict[str, float]:
    """The step's metrics as one Learner would report them on the whole batch."""
    parts = [
        {
            k.removeprefix("train/"): v
            for k, v in m.items()
            if k.startswith("train/") and k not in _GLOBAL_KEYS + _OWN_KEYS
        }
        for m in per_rank
    ]
    merged = {f"train/{k}": v for k, v in combine_metrics(parts).items()}
    merged.update({k: per_rank[0][k] for k in _GLOBAL_KEYS if k in per_rank[0]})
    used = [abs(a) for s in shards for a, v in zip(s.advantages, s.valid, strict=True) if v]
    merged["train/advantage_abs_mean"] = sum(used) / len(used) if used else 0.0
    merged["train/seconds"] = max(m.get("train/seconds", 0.0) for m in per_rank)
    gaps = [
        (m, sum(len(c.token_ids) for g in s.groups for c in g.completions))
        for m, s in zip(per_rank, shards, strict=True)
        if "sync/logprob_gap_mean" in m
    ]
    if gaps:
        tokens = sum(w for _, w in gaps)
        merged["sync/logprob_gap_mean"] = sum(m["sync/logprob_gap_mean"] * w for m, w in gaps) / max(
            tokens, 1
        )
        merged["sync/logprob_gap_max"] = max(m["sync/logprob_gap_max"] for m, _ in gaps)
    return merged


@dataclasses.dataclass
class PendingTrainStep:
    """An update running on the learner ranks: `refs` to wait on, `result()` its metrics."""

    refs: list[Any]
    shards: list[Shard] | None  # None: one rank trained on the whole batch

    def result(self) -> dict[str, float]:
        """The step's metrics (blocks until every rank is done; RayActorError if a rank died)."""
        import ray

        per_rank = ray.get(self.refs)
        return dict(per_rank[0]) if self.shards is None else merge_metrics(per_rank, self.shards)


class LearnerGroup:
    """The learner's verbs over `ranks` (Learner actor handles), driver side. With more than one rank
    they join a DeepSpeed group (ZeRO stage `cfg.zero_stage`) as soon as they have loaded the model;
    every call below waits for that first."""

    def __init__(self, ranks: list[Any], cfg: LearnerConfig, placement_group: Any = None) -> None:
        self.ranks = ranks
        self.cfg = cfg
        self.placement_group = placement_group
        self._joining: list[Any] = []
        if len(ranks) > 1:
            # Ray resolves the address ref before the joins run: nothing here blocks on model loading.
            address = ranks[0].rendezvous.remote()
            self._joining = [r.join_data_parallel.remote(i, len(ranks), address) for i, r in enumerate(ranks)]

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def ready(self) -> None:
        """Block until every rank has loaded the model and joined the data-parallel group."""
        import ray

        if self._joining:
            ray.get(self._joining)
            self._joining = []

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One GRPO update on `batch` (P groups x G completions, rewards_P_G); the step's `train/*` and
        `sync/logprob_gap_*` metrics as one Learner on the whole batch reports them."""
        return self.start_train_step(batch).result()

    def start_train_step(self, batch: Batch) -> PendingTrainStep:
        """`train_step` without waiting: the update runs on the ranks while the driver goes on.

        Calls the driver sends the ranks afterwards (export, checkpoint) run after this update."""
        self.ready()
        if self.world_size == 1:
            return PendingTrainStep([self.ranks[0].train_step.remote(batch)], None)
        shards = split_batch(batch, self.world_size, self.cfg)
        refs = [r.train_shard.remote(s) for r, s in zip(self.ranks, shards, strict=True)]
        return PendingTrainStep(refs, shards)

    def export_for_sync(
        self, kind: str, include_base: bool, check_every: int = 0, final_version: int = -1
    ) -> tuple[Any, Any]:
        """(update ref, (version, checksum, merged checksum) ref) from rank 0: every rank holds the
        same policy. See Learner.export_for_sync."""
        self.ready()
        refs = (
            self.ranks[0]
            .export_for_sync.options(num_returns=2)
            .remote(kind, include_base, check_every, final_version)
        )
        return refs[0], refs[1]

    def weight_names(self, packed_modules: dict[str, list[str]]) -> list[str]:
        import ray

        self.ready()  # every rank remembers the engine's fusion map, so any could export
        return list(ray.get([r.weight_names.remote(packed_modules) for r in self.ranks])[0])

    def startup_spans(self) -> list[tuple[str, float, float, float]]:
        """Rank 0's start-up phases (every rank loads the same model at the same time)."""
        import ray

        return list(ray.get(self.ranks[0].startup_spans.remote()))

    def checkpoint_state(self) -> dict[str, Any]:
        """Rank 0's state, in the single-learner format (ZeRO's partitioned optimiser state is gathered,
        a collective, so every rank takes part; only rank 0's copy is fetched)."""
        import ray

        self.ready()
        refs = [r.checkpoint_state.remote() for r in self.ranks]
        if len(refs) > 1:
            ray.wait(refs[1:], num_returns=len(refs) - 1, fetch_local=False)
        return dict(ray.get(refs[0]))

    def restore(self, state: dict[str, Any], version: int) -> None:
        """Every rank continues from a checkpoint's learner state at policy `version`."""
        import ray

        self.ready()
        ref = ray.put(state)
        ray.get([r.restore.remote(ref, version) for r in self.ranks])

    def load_adapter(self, tensors: dict[str, Any]) -> None:
        """Every rank loads these adapter weights (PEFT state-dict names), e.g. for `grpo-ray eval`."""
        import ray

        self.ready()
        ref = ray.put(tensors)
        ray.get([r.load_adapter.remote(ref) for r in self.ranks])

    def stop(self) -> None:
        """Kill every rank and free their placement group."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for rank in self.ranks:
            ray.kill(rank)
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
