"""The derived plan: every number the run will use, computed from the config and printed first."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.config import RunConfig
from cluster.placement import plan_bundles
from grpo_ray.partition import even_counts


@dataclass(frozen=True)
class Plan:
    sequences_per_step: int
    micro_batches_per_step: int
    optimizer_steps_per_step: int
    prompts_per_worker: list[int]
    total_prompts: int
    total_sequences: int
    max_sequence_tokens: int

    def render(self, cfg: RunConfig) -> str:
        lines = [
            f"grpo-ray plan for '{cfg.name}' (model {cfg.model})",
            f"  step    : {cfg.prompts_per_step} prompts x group {cfg.group_size} = {self.sequences_per_step} "
            f"sequences -> {self.micro_batches_per_step} micro-batches of {cfg.learner.micro_batch_size}, "
            f"{self.optimizer_steps_per_step} optimiser step(s)",
            f"  run     : {cfg.steps} steps = {self.total_prompts} prompts, {self.total_sequences} completions",
            f"  tokens  : prompt <= {cfg.data.max_prompt_tokens} + completion <= "
            f"{cfg.rollout.sampling.max_new_tokens} = {self.max_sequence_tokens} (engine max {cfg.rollout.max_model_len})",
            f"  policy  : {cfg.learner.quantization} base + LoRA r={cfg.learner.lora.rank} "
            f"alpha={cfg.learner.lora.alpha} on {cfg.learner.lora.target_modules}; sync '{cfg.sync}'",
            f"  workers : {cfg.rollout.num_workers} rollout worker(s) pulling chunks of "
            f"{cfg.rollout.prompts_per_chunk} prompts ({-(-cfg.prompts_per_step // cfg.rollout.prompts_per_chunk)} "
            f"per step) from a queue; placement '{cfg.placement}'",
            f"  rollouts: {_rollout_mode(cfg)}",
        ]
        for bundle in plan_bundles(cfg):
            lines.append(f"    {bundle.role:<10} CPU {bundle.cpus:g}  GPU {bundle.gpus:g}")
        return "\n".join(lines)


def _rollout_mode(cfg: RunConfig) -> str:
    k = cfg.max_staleness
    if k == 0:
        return "synchronous (each step sampled by the newest policy; max_staleness 0)"
    return (
        f"asynchronous: the pool samples up to {k} step(s) ahead while the learner trains; a step trains on "
        f"groups at most {k} policy version(s) old, truncated importance sampling corrects for their age"
    )


def derive_plan(cfg: RunConfig) -> Plan:
    sequences = cfg.prompts_per_step * cfg.group_size
    return Plan(
        sequences_per_step=sequences,
        micro_batches_per_step=sequences // cfg.learner.micro_batch_size,
        optimizer_steps_per_step=cfg.learner.passes,
        prompts_per_worker=even_counts(cfg.prompts_per_step, cfg.rollout.num_workers),
        total_prompts=cfg.steps * cfg.prompts_per_step,
        total_sequences=cfg.steps * sequences,
        max_sequence_tokens=cfg.data.max_prompt_tokens + cfg.rollout.sampling.max_new_tokens,
    )
