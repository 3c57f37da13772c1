"""RolloutWorker: the Ray actor that owns one vLLM engine.

Coarse verbs only: `generate`, `load`, `check_weight_names`. Resources (CPUs, GPUs, placement) are
chosen in cluster/placement.py; this class knows nothing about them.
"""

from __future__ import annotations

import time
from typing import Any

from grpo_ray.checksum import weights_checksum
from grpo_ray.cpu_cores import pin_from_env
from grpo_ray.records import Group, SyncAck, WeightUpdate
from grpo_ray.seeds import engine_seed
from grpo_ray.spans import Span, Spans, imports_without_gc, process_cpu_so_far, process_start_time
from grpo_ray.weight_names import check_names
from rollout.config import RolloutConfig


class RolloutWorker:
    """One vLLM engine (rollout/engine.py) and the policy version it holds (-1 until the first sync)."""

    def __init__(
        self,
        index: int,
        model: str,
        cfg: RolloutConfig,
        seed: int,
        lora_rank: int | None = None,
        sleep_mode: bool = False,
    ) -> None:
        # Start-up phases: the actor's process start (Ray's worker boot and this module's imports)
        # up to here, then torch, vLLM and the engine (see `startup_spans`).
        self.spans = Spans()
        self.spans.add("process start", process_start_time(), time.time(), process_cpu_so_far())
        pin_from_env()  # cores cluster/placement.py chose (resource-fair CPU benchmarks), before threads start
        with self.spans.span("import torch"), imports_without_gc():
            import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(cfg.threads_per_worker)
        from rollout.engine import RolloutEngine

        self.index = index
        self.version = -1  # -1: still the checkpoint's own weights, never the learner's policy
        self.sleep_mode = sleep_mode and torch.cuda.is_available()  # vLLM sleep mode is CUDA-only
        self.engine = RolloutEngine(
            model,
            cfg,
            seed=engine_seed(seed, index),
            lora_rank=lora_rank,
            sleep_mode=self.sleep_mode,
            spans=self.spans,
        )
        from rollout.worker_merge import WorkerMerge

        device = "cuda" if torch.cuda.is_available() else "cpu"
        store = device if cfg.worker_merge_base == "device" else "cpu"
        # Holds nothing until a worker_merge sync brings the base (sync: worker_merge only).
        self._worker_merge = WorkerMerge(store=store, compute=device, dtype=getattr(torch, cfg.dtype))

    def generate(
        self,
        prompts: list[tuple[int, list[int]]],
        group_size: int,
        seeds: list[int] | None = None,
        greedy: bool = False,
    ) -> list[Group]:
        """One Group of `group_size` completions per (row index, prompt token ids), in order.

        `seeds[i]` seeds prompt i's request (its samples get seeds[i] .. seeds[i] + group_size - 1);
        `greedy`: temperature 0. Each Group carries this worker's policy version. Raises RuntimeError
        when asked to sample before the first sync (the engine still holds the checkpoint's weights).
        """
        if self.version < 0 and not greedy:
            raise RuntimeError(
                f"rollout worker {self.index} has not received the learner's policy yet; "
                "the driver must sync before sampling"
            )
        samples = self.engine.generate([ids for _, ids in prompts], n=group_size, seeds=seeds, greedy=greedy)
        return [
            Group(
                prompt_index=row,
                prompt_token_ids=ids,
                completions=completions,
                policy_version=self.version,
                worker=self.index,
            )
            for (row, ids), completions in zip(prompts, samples, strict=True)
        ]

    def load(self, update: WeightUpdate) -> SyncAck:
        """Load the learner's new policy in place; the ack carries what was actually received.

        worker_merge: the merged weights are rebuilt here from the kept base and the update's LoRA;
        with `update.full_check` the ack also carries their checksum. Raises WorkerMergeError for an
        update that needs a base this worker does not hold (a new or restarted worker).
        """
        start = time.perf_counter()
        checksum = weights_checksum(update.tensors)
        merged_checksum = None
        if checksum == update.checksum:
            if update.mode == "merged":
                self.engine.load_weights(update.tensors)
            elif update.mode == "worker_merge":
                # Built one layer at a time as the engine's reload consumes them (grpo_ray.merge_math).
                self.engine.load_weights(self._worker_merge.merged(update))
                merged_checksum = self._worker_merge.last_checksum
            else:
                assert update.adapter_config is not None, "adapter updates carry their PEFT config"
                self.engine.load_adapter(update.tensors, update.adapter_config, update.version)
            self.version = update.version
        # A bad checksum is reported, not raised: the driver names this worker and stops the run.
        return SyncAck(
            worker=self.index,
            version=self.version,
            checksum=checksum,
            seconds=time.perf_counter() - start,
            merged_checksum=merged_checksum,
        )

    def sleep(self) -> None:
        """Free the device for the learner (colocate mode on a GPU; a no-op elsewhere)."""
        if self.sleep_mode:
            self.engine.sleep()

    def wake_up(self) -> None:
        """Take the device back after `sleep` (a no-op when sleep mode is off)."""
        if self.sleep_mode:
            self.engine.wake_up()

    def check_weight_names(self, checkpoint_names: list[str]) -> list[str]:
        """Problems mapping the learner's parameter names onto this engine (empty list: all map)."""
        return check_names(checkpoint_names, self.engine.parameter_names(), self.engine.packed_modules())

    def packed_modules(self) -> dict[str, list[str]]:
        """The engine's fused modules (e.g. qkv_proj -> [q_proj, k_proj, v_proj])."""
        return self.engine.packed_modules()

    def startup_spans(self) -> list[Span]:
        """(phase, begin, end) in epoch seconds of this worker's start-up, for the driver's breakdown."""
        return list(self.spans.items)

    def info(self) -> dict[str, Any]:
        """This worker's index, policy version and the engine's EOS token ids."""
        return {"index": self.index, "version": self.version, "eos_ids": self.engine.eos_ids}
