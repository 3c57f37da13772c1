"""Learner: the Ray actor that trains the QLoRA policy and exports it for the rollout workers.

Coarse verbs: `train_step(batch)`, `export(...)`, `weight_names()`. The math is in learner/grpo.py;
this file only moves tensors between it and the model. Several Learners can train one policy
data-parallel: each becomes a rank (`join_data_parallel`) and trains its `Shard` of every batch
(`train_shard`); learner/data_parallel.py drives them.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import torch

from grpo_ray.checksum import weights_checksum
from grpo_ray.cpu_cores import pin_from_env
from grpo_ray.records import Batch, Group, Shard, WeightUpdate
from grpo_ray.spans import Span, Spans, process_cpu_so_far, process_start_time
from learner.config import LearnerConfig, LossConfig
from learner.grpo import combine_metrics, group_advantages, grpo_loss, loss_normaliser
from learner.logprobs import (
    PackedSequences,
    PromptSharedSequences,
    causal_lm,
    completion_logprobs,
    pack,
    pack_sharing_prompts,
)
from learner.merge import base_tensors, lora_tensors, merged_weights, modules_to_send, parameter_names
from learner.model import load_adapter_weights, load_policy, torch_dtype
from learner.optim import LocalUpdater, Updater


class Learner:
    def __init__(
        self,
        model: str,
        cfg: LearnerConfig,
        seed: int,
        temperature: float,
        rollout_dtype: str,
        pad_id: int,
    ) -> None:
        # Start-up phases: the process start (Ray's worker boot, torch and this module's imports)
        # up to here, then the model load (see `startup_spans`).
        self.spans = Spans()
        self.spans.add("process start", process_start_time(), time.time(), process_cpu_so_far())
        pin_from_env()  # cores cluster/placement.py chose (resource-fair CPU benchmarks)
        self.device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.temperature = temperature
        self.pad_id = pad_id
        self.rollout_dtype = torch_dtype(rollout_dtype)
        self.policy = load_policy(model, cfg, seed=seed, device=self.device, spans=self.spans)
        self.trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.updater: Updater = LocalUpdater(self.trainable, cfg)
        self.model: Any = self.policy  # what forwards run through (a rank's DeepSpeed engine wraps it)
        # Log-probabilities are taken from the final hidden states this many tokens at a time.
        self.chunk_tokens = cfg.chunk_tokens_for(causal_lm(self.policy).get_output_embeddings().out_features)
        self.version = 0  # bumped by every optimiser step pass over a batch
        self.packed_modules: dict[str, list[str]] = {}

    def startup_spans(self) -> list[Span]:
        """(phase, begin, end) in epoch seconds of this rank's start-up, for the driver's breakdown."""
        return list(self.spans.items)

    # ---- policy sync -------------------------------------------------------------------------

    def weight_names(self, packed_modules: dict[str, list[str]]) -> list[str]:
        """Checkpoint parameter names a full merged sync sends; remembers the engine's fusion map."""
        self.packed_modules = packed_modules
        modules = modules_to_send(self.policy, packed_modules, include_base=True)
        return parameter_names(self.policy, modules)

    def export(self, kind: str, include_base: bool = False) -> WeightUpdate:
        """The current policy for the rollout side.

        kind "merged": dense merged weights of the adapted layers (plus every 4-bit layer when
        `include_base`); "base": the dequantized 4-bit layers without the adapter (adapter sync's
        first step); "adapter": the PEFT adapter for vLLM LoRA; "worker_merge": the absolute LoRA
        A/B of the adapted layers (plus, when `include_base`, every base layer as stored: packed
        NF4 codes and quantization state, or dense), from which the worker builds "merged" itself.
        """
        if kind == "worker_merge":
            return self._worker_merge_update(include_base)
        if kind == "adapter":
            tensors, config = self._adapter_tensors()
            return WeightUpdate(
                version=self.version,
                mode="adapter",
                tensors=tensors,
                checksum=weights_checksum(tensors),
                adapter_config=config,
            )
        with_base = include_base or kind == "base"
        modules = modules_to_send(self.policy, self.packed_modules, include_base=with_base)
        # Each merged tensor goes to host memory as it is built: the object store needs it there, and
        # the device never holds a second copy of the model.
        tensors = [
            (name, tensor.cpu())
            for name, tensor in merged_weights(
                self.policy, modules, self.rollout_dtype, with_lora=kind == "merged"
            )
        ]
        return WeightUpdate(
            version=self.version,
            mode="merged",
            tensors=tensors,
            checksum=weights_checksum(tensors),
            base_weights=with_base,
        )

    def export_for_sync(
        self, kind: str, include_base: bool, check_every: int = 0, final_version: int = -1
    ) -> tuple[WeightUpdate, tuple[int, str, str | None]]:
        """Called with num_returns=2: the driver reads only the small (version, checksum, merged
        checksum) summary, and passes the update's object ref to every worker, so the weights never
        pass through it.

        worker_merge's full check: on the first sync (`include_base`), every `check_every` versions
        and at `final_version`, the update asks the workers for the checksum of the weights they
        rebuilt, and the summary carries `merged_checksum()` to compare it with (else None). That
        check costs one merge here, the same work as a merged export.
        """
        update = self.export(kind, include_base)
        expected = None
        if kind == "worker_merge":
            due = check_every > 0 and update.version % check_every == 0
            update.full_check = include_base or due or update.version == final_version
            expected = self.merged_checksum() if update.full_check else None
        return update, (update.version, update.checksum, expected)

    def merged_checksum(self) -> str:
        """Checksum of what a `merged` sync without base would carry (the adapted layers closed under
        the engine's fusion, in the rollout dtype): a worker_merge worker's rebuilt weights must match."""
        modules = modules_to_send(self.policy, self.packed_modules, include_base=False)
        return weights_checksum(merged_weights(self.policy, modules, self.rollout_dtype))

    def _worker_merge_update(self, include_base: bool) -> WeightUpdate:
        kept = modules_to_send(self.policy, self.packed_modules, include_base=False)
        loaded = (
            modules_to_send(self.policy, self.packed_modules, include_base=True) if include_base else kept
        )
        tensors, scaling = lora_tensors(self.policy, kept)
        if include_base:
            tensors = list(base_tensors(self.policy, loaded)) + tensors
        return WeightUpdate(
            version=self.version,
            mode="worker_merge",
            tensors=tensors,
            checksum=weights_checksum(tensors),
            base_weights=include_base,
            merge_modules=loaded,
            keep_base=kept if include_base else [],
            lora_scaling=scaling,
        )

    def _adapter_tensors(self) -> tuple[list[tuple[str, torch.Tensor]], dict[str, Any]]:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.policy)
        tensors = [
            (name, tensor.detach().to("cpu", torch.float32).contiguous()) for name, tensor in state.items()
        ]
        config = self.policy.peft_config["default"].to_dict()
        config["target_modules"] = sorted(config["target_modules"])
        # Through JSON and back: PEFT's str-enums (peft_type, task_type) become plain str, so the
        # driver unpickling a checkpoint state never imports peft (and transformers: ~5 CPU s).
        return tensors, json.loads(json.dumps({k: v for k, v in config.items() if _json_safe(v)}))

    # ---- training ----------------------------------------------------------------------------

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One GRPO update on a scored batch (P groups x G completions, rewards_P_G; None = masked).

        Advantages per group (learner/grpo.py), the loss over micro-batches of
        `cfg.micro_batch_size` sequences, `cfg.passes` optimiser steps; bumps the policy version.
        Returns `train/*` metrics (loss, kl_mean, clip fractions, importance ratios, grad_norm, lr,
        seconds) and `sync/logprob_gap_{mean,max}` (|learner - sampler| logprob on sampled tokens).
        """
        rows = _flatten(batch.groups)
        advantages_B, valid_B, normaliser = batch_targets(batch, self.cfg.loss)
        return self._train(rows, advantages_B, valid_B, normaliser, self._micro_batches(rows))

    def train_shard(self, shard: Shard) -> dict[str, float]:
        """A data-parallel rank's part of one update: its sequences, with the whole batch's advantages
        and normaliser. Every rank must be called with its shard of the same batch."""
        rows = _flatten(shard.groups)
        advantages_B = torch.tensor(shard.advantages, dtype=torch.float32)
        valid_B = torch.tensor(shard.valid, dtype=torch.bool)
        micro_batches = self._micro_batches(rows, count=shard.micro_batches)
        return self._train(rows, advantages_B, valid_B, shard.normaliser, micro_batches)

    def _train(
        self,
        rows: list[dict[str, Any]],
        advantages_B: torch.Tensor,
        valid_B: torch.Tensor,
        normaliser: float,
        micro_batches: list[list[int]],
    ) -> dict[str, float]:
        start = time.perf_counter()
        self.policy.train()
        fixed = self._fixed_logprobs(rows, micro_batches)
        pass_metrics = []
        for _ in range(self.cfg.passes):
            self.updater.zero_grad()
            parts = [
                self._accumulate(
                    rows, indices, advantages_B, valid_B, normaliser, fixed, last=k == len(micro_batches) - 1
                )
                for k, indices in enumerate(micro_batches)
            ]
            lr_used = self.updater.lr()  # the rate this optimiser step applies (the scheduler moves after it)
            grad_norm = self.updater.step()
            merged = combine_metrics(parts)
            merged["grad_norm"] = grad_norm
            pass_metrics.append(merged)
        self.version += 1
        if self.device == "cuda":
            # Colocated vLLM wakes into this memory; the caching allocator would otherwise keep it.
            torch.cuda.empty_cache()

        metrics = {f"train/{k}": v for k, v in pass_metrics[-1].items()}
        metrics["train/lr"] = lr_used
        metrics["train/advantage_abs_mean"] = (
            float(advantages_B[valid_B].abs().mean()) if valid_B.any() else 0.0
        )
        metrics["train/seconds"] = time.perf_counter() - start
        metrics.update(_mismatch(rows, fixed["old"]))
        return metrics

    def _micro_batches(self, rows: list[dict[str, Any]], count: int | None = None) -> list[list[int]]:
        """Index lists of at most micro_batch_size rows; exactly `count` of them when given (a rank
        with fewer rows than that gets empty ones, which still take part in the collectives)."""

        def length(i: int) -> int:
            return len(rows[i]["prompt"]) + len(rows[i]["completion"])

        if self.cfg.share_prompt_forward:
            # A prompt's rows together, so each micro-batch runs few distinct prompts; prompts ordered
            # by their longest row, so rows of similar length share a micro-batch's padding.
            by_prompt: dict[tuple[int, ...], list[int]] = {}
            for i in range(len(rows)):
                by_prompt.setdefault(tuple(rows[i]["prompt"]), []).append(i)
            ordered = sorted(by_prompt.values(), key=lambda same: max(length(i) for i in same))
            order = [i for same in ordered for i in sorted(same, key=length)]
        else:
            # Similar lengths together: less padding per forward. Order does not change the gradient.
            order = sorted(range(len(rows)), key=length)
        size = self.cfg.micro_batch_size
        chunks = [order[i : i + size] for i in range(0, len(order), size)]
        if count is not None:
            if len(chunks) > count:
                raise ValueError(f"{len(rows)} rows need {len(chunks)} micro-batches of {size}, not {count}")
            chunks += [[] for _ in range(count - len(chunks))]
        return chunks

    @torch.no_grad()
    def _fixed_logprobs(self, rows: list[dict[str, Any]], micro_batches: list[list[int]]) -> dict[str, Any]:
        """Logprobs that stay fixed during the update: the pre-update policy's and the reference's.

        The pre-update logprobs are the first pass's forward, detached (`_accumulate` records them),
        so they cost no forward of their own, unless LoRA dropout makes that forward differ from the
        policy the sampler ran. The reference is this model with the adapter off.
        """
        old: dict[int, torch.Tensor] = {}
        ref: dict[int, torch.Tensor] = {}
        need_old = self.cfg.lora.dropout > 0 and (self.cfg.passes > 1 or self.cfg.loss.tis_cap is not None)
        if not need_old and self.cfg.loss.beta == 0:
            return {"old": old, "ref": ref}  # the common case: no forward here, so nothing to pack
        for indices in (i for i in micro_batches if i):
            packed = self._pack(rows, indices)
            if need_old:
                self.policy.eval()
                logprobs, _ = completion_logprobs(
                    self.model, packed, self.temperature, chunk_tokens=self.chunk_tokens
                )
                self.policy.train()
                old.update({i: logprobs[k] for k, i in enumerate(indices)})
            if self.cfg.loss.beta > 0:
                with self.policy.disable_adapter():
                    ref_logprobs, _ = completion_logprobs(
                        self.policy, packed, self.temperature, chunk_tokens=self.chunk_tokens
                    )
                ref.update({i: ref_logprobs[k] for k, i in enumerate(indices)})
        return {"old": old, "ref": ref}

    def _accumulate(
        self,
        rows: list[dict[str, Any]],
        indices: list[int],
        advantages_B: torch.Tensor,
        valid_B: torch.Tensor,
        normaliser: float,
        fixed: dict[str, Any],
        last: bool,
    ) -> dict[str, float]:
        if not indices:  # a rank's filler micro-batch: zero gradient, same collectives as the others
            logits = self.model(input_ids=torch.full((1, 1), self.pad_id, device=self.device)).logits
            self.updater.backward(logits.sum() * 0.0, last)
            return {}
        packed = self._pack(rows, indices)
        logprobs_B_T, entropy_B_T = completion_logprobs(
            self.model, packed, self.temperature, with_entropy=True, chunk_tokens=self.chunk_tokens
        )
        width = logprobs_B_T.shape[1]
        mask_B_T = packed.completion_mask_B_T & valid_B[indices].to(self.device)[:, None]
        if indices[0] in fixed["old"]:
            old_B_T = _stack([fixed["old"][i] for i in indices], width)
        else:  # the first pass: this forward is the pre-update policy
            old_B_T = logprobs_B_T.detach()
            fixed["old"].update({i: old_B_T[k] for k, i in enumerate(indices)})
        ref_B_T = _stack([fixed["ref"][i] for i in indices], width) if fixed["ref"] else None
        sampler_B_T = _stack([torch.tensor(rows[i]["sampler_logprobs"]) for i in indices], width).to(
            self.device
        )
        loss, metrics = grpo_loss(
            logprobs_B_T,
            old_B_T,
            advantages_B[indices].to(self.device),
            mask_B_T,
            self.cfg.loss,
            normaliser,
            ref_logprobs_B_T=ref_B_T,
            sampler_logprobs_B_T=sampler_B_T if self.cfg.loss.tis_cap is not None else None,
        )
        self.updater.backward(loss, last)
        assert entropy_B_T is not None
        token_mask = packed.completion_mask_B_T
        metrics["entropy"] = float(entropy_B_T[token_mask].mean()) if token_mask.any() else 0.0
        return metrics

    def _pack(
        self, rows: list[dict[str, Any]], indices: list[int]
    ) -> PackedSequences | PromptSharedSequences:
        layout = pack_sharing_prompts if self.cfg.share_prompt_forward else pack
        return layout(
            [rows[i]["prompt"] for i in indices],
            [rows[i]["completion"] for i in indices],
            self.pad_id,
            self.device,
        )

    # ---- state -------------------------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to continue exactly: adapter, optimiser, scheduler, RNG (for LoRA dropout)."""
        tensors, config = self._adapter_tensors()
        return {
            "adapter": dict(tensors),
            "adapter_config": config,
            **self.updater.state_dict(),  # "optimizer", "scheduler"
            "torch_rng": torch.get_rng_state(),
            "version": self.version,
        }

    def load_adapter(self, tensors: dict[str, torch.Tensor]) -> None:
        """Adapter weights in PEFT's state-dict naming (as saved by save_pretrained / checkpoints)."""
        load_adapter_weights(self.policy, tensors)
        self.updater.weights_loaded()

    def restore(self, state: dict[str, Any], version: int) -> None:
        """Continue from a checkpoint: adapter weights, optimiser and scheduler state, RNG, version."""
        self.load_adapter(state["adapter"])
        self.updater.load_state_dict(state)
        torch.set_rng_state(state["torch_rng"])
        self.version = version

    def lora_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.policy.named_parameters() if p.requires_grad}

    # ---- data parallel -----------------------------------------------------------------------

    def rendezvous(self) -> tuple[str, int]:
        """This rank's address and a free port: rank 0's is where the group meets."""
        from learner.zero import rendezvous_address

        return rendezvous_address()

    def join_data_parallel(self, rank: int, world_size: int, address: tuple[str, int]) -> None:
        """Become one rank of a DeepSpeed data-parallel group (call on every rank at once: it blocks
        until all have joined). From here on `train_shard` trains, and state calls are collective."""
        from learner.zero import ZeroUpdater

        updater = ZeroUpdater(self.policy, self.trainable, self.cfg, rank, world_size, *address)
        self.updater, self.model = updater, updater.engine


def batch_targets(batch: Batch, loss: LossConfig) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-sequence advantages and validity (flattened group by group), and the loss normaliser:
    what only the whole batch determines."""
    rewards_P_G = torch.tensor(
        [[math.nan if r is None else r for r in group] for group in batch.rewards_P_G],
        dtype=torch.float32,
    )
    valid_P_G = ~torch.isnan(rewards_P_G)
    advantages_B = group_advantages(rewards_P_G, valid_P_G, scale_by_std=loss.scale_advantages_by_std)
    valid_B = valid_P_G.reshape(-1)
    lengths_B = torch.tensor([len(c.token_ids) for g in batch.groups for c in g.completions])
    steps_T = torch.arange(max(1, int(lengths_B.max())))
    full_mask_B_T = (steps_T[None, :] < lengths_B[:, None]) & valid_B[:, None]
    normaliser = loss_normaliser(full_mask_B_T, loss.aggregation, batch.max_new_tokens)
    return advantages_B.reshape(-1), valid_B, normaliser


def _flatten(groups: list[Group]) -> list[dict[str, Any]]:
    return [
        {"prompt": g.prompt_token_ids, "completion": c.token_ids, "sampler_logprobs": c.logprobs}
        for g in groups
        for c in g.completions
    ]


def _stack(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=torch.float32, device=rows[0].device if rows else "cpu")
    for k, row in enumerate(rows):
        n = min(width, row.shape[0])
        out[k, :n] = row[:n]
    return out


def _mismatch(rows: list[dict[str, Any]], old: dict[int, torch.Tensor]) -> dict[str, float]:
    """|learner - sampler| logprob gap on sampled tokens: near 0 when the sync is exact."""
    gaps = [
        (old[i][: len(r["completion"])].cpu() - torch.tensor(r["sampler_logprobs"])).abs()
        for i, r in enumerate(rows)
        if i in old and r["completion"]
    ]
    if not gaps:
        return {}
    flat = torch.cat(gaps)
    finite = flat[torch.isfinite(flat)]  # a NaN sampler logprob is counted by tis/nonfinite_sampler
    if not len(finite):
        return {}
    return {"sync/logprob_gap_mean": float(finite.mean()), "sync/logprob_gap_max": float(finite.max())}


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True
