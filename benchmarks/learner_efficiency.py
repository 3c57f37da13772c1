"""Learner efficiency: `Learner.train_step` tokens/s vs a plain PEFT forward + backward on the same batch.

One process, no Ray: the grpo-ray Learner class is constructed directly (the Ray hop is visible in
the e2e breakdown as train minus learner compute). The baseline is the same QLoRA model
(learner.model.load_policy, same seed, same LoRA) trained the plain way: per micro-batch (the same
length-sorted micro-batches of 64) one forward, log-probs of the completion tokens at the sampling
temperature, an advantage-weighted sum, backward; then gradient clipping and an AdamW step. That is
the minimum any GRPO learner has to compute. grpo-ray's step is measured twice: as it runs by default
(each distinct prompt forwarded once per micro-batch, its completions continuing from the prompt's
KV cache) and with learner.share_prompt_forward off (every row is prompt + completion, as the plain
baseline). Both take the pre-update logprobs for truncated importance sampling (tis_cap 2.0) from
the update's own forward. The three sides take turns on the same batch, in rotated order, after one
warm-up step each.

The batch: the workload's 16 prompts x 8 completions of 64 tokens (uniformly random non-EOS ids, as
the random-weight benchmark model samples them), rewards 0/1 within each group.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.common import (
    WORKLOAD,
    Settings,
    bench_config,
    child_main,
    fmt_range,
    goal_check,
    ratio_summary,
    rotated,
    run_child,
    summary,
    train_prompts,
)

GOAL = 0.9  # Learner.train_step tokens/s over plain PEFT's
UNSHARED = "grpo-ray (prompt sharing off)"
SIDES = ("grpo-ray", UNSHARED, "plain PEFT")


def run(settings: Settings) -> dict[str, Any]:
    variants = ["nf4"] if settings.quick else ["nf4", "none"]
    section: dict[str, Any] = {"goal": GOAL, "variants": {}}
    for quantization in variants:
        spec = {
            "kind": "efficiency",
            "model": str(settings.model),
            "quantization": quantization,
            "rounds": max(settings.timed_steps, settings.repeats) if not settings.quick else 1,
            "cores": settings.cores,
            "threads": settings.cores,
        }
        section["variants"][quantization] = run_child(
            "learner_efficiency", spec, settings, f"learner-{quantization}"
        )
    return section


class PlainPeft:
    """The baseline: the same PEFT model, trained with the least code a GRPO update needs."""

    def __init__(self, model: str, cfg: Any, seed: int, temperature: float, pad_id: int) -> None:
        import torch

        from learner.model import load_policy

        self.policy = load_policy(model, cfg, seed=seed, device="cpu")
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.cfg, self.temperature, self.pad_id = cfg, temperature, pad_id

    def train_step(self, batch: Any) -> None:
        import torch

        from learner.learner import batch_targets
        from learner.logprobs import pack

        rows = [(g.prompt_token_ids, c.token_ids) for g in batch.groups for c in g.completions]
        advantages_B, valid_B, normaliser = batch_targets(batch, self.cfg.loss)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
        size = self.cfg.micro_batch_size
        self.policy.train()
        self.optimizer.zero_grad(set_to_none=True)
        for chunk in (order[i : i + size] for i in range(0, len(order), size)):
            packed = pack([rows[i][0] for i in chunk], [rows[i][1] for i in chunk], self.pad_id, "cpu")
            ids_B_L = packed.input_ids_B_L
            logits = self.policy(input_ids=ids_B_L, attention_mask=packed.attention_mask_B_L).logits
            logprobs = torch.log_softmax(logits[:, :-1].float() / self.temperature, dim=-1)
            token_logprobs = logprobs.gather(-1, ids_B_L[:, 1:, None]).squeeze(-1)
            # weight: the sequence's advantage on its completion tokens, 0 on prompt and padding
            positions = torch.arange(ids_B_L.shape[1] - 1)[None, :]
            start = packed.prompt_lens_B[:, None] - 1
            on_completion = (positions >= start) & (positions < start + packed.completion_lens_B[:, None])
            weight = (advantages_B[chunk] * valid_B[chunk])[:, None] * on_completion
            loss = -(token_logprobs * weight).sum() / normaliser
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()


def make_batch(model: str, seed: int = 0) -> Any:
    import torch

    from grpo_ray.records import Batch, Completion, Group
    from rollout.engine import model_eos_ids

    w = WORKLOAD
    eos = set(model_eos_ids(model))
    vocab = int(_config(model)["vocab_size"])
    allowed = torch.tensor([t for t in range(vocab) if t not in eos])
    g = torch.Generator().manual_seed(seed)
    groups = []
    for _i, prompt in enumerate(train_prompts(model, w.prompts_per_step)):
        completions = []
        for _ in range(w.group_size):
            ids = allowed[torch.randint(len(allowed), (w.max_new_tokens,), generator=g)].tolist()
            completions.append(
                Completion(ids, [-float(torch.log(torch.tensor(len(allowed))))] * len(ids), "length", "")
            )
        groups.append(Group(prompt.index, prompt.token_ids, completions, policy_version=0, worker=0))
    rewards: list[list[float | None]] = [[float(j % 2) for j in range(w.group_size)] for _ in groups]
    return Batch(groups, rewards, w.max_new_tokens)


def _config(model: str) -> dict[str, Any]:
    import json
    from pathlib import Path

    return dict(json.loads((Path(model) / "config.json").read_text()))


def efficiency_child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from cluster.data.encoding import pad_id_of
    from learner.learner import Learner

    torch.set_num_threads(spec["cores"])
    model = spec["model"]
    cfg = bench_config(
        model, steps=1, run_root=spec["tmp_dir"], quantization=spec["quantization"], cores=spec["cores"]
    )
    tokenizer = AutoTokenizer.from_pretrained(model)
    pad_id = pad_id_of(tokenizer)
    temperature = cfg.rollout.sampling.temperature
    unshared = cfg.learner.model_copy(update={"share_prompt_forward": False})
    learners = {
        "grpo-ray": Learner(model, cfg.learner, cfg.seed, temperature, cfg.rollout.dtype, pad_id),
        UNSHARED: Learner(model, unshared, cfg.seed, temperature, cfg.rollout.dtype, pad_id),
    }
    plain = PlainPeft(model, cfg.learner, cfg.seed, temperature, pad_id)
    batch = make_batch(model)
    tokens = float(
        sum(len(g.prompt_token_ids) + len(c.token_ids) for g in batch.groups for c in g.completions)
    )

    def step(side: str) -> float:
        begin = time.perf_counter()
        if side == "plain PEFT":
            plain.train_step(batch)
        else:
            learners[side].train_step(batch)
        return time.perf_counter() - begin

    for side in SIDES:  # warm-up
        step(side)
    seconds: dict[str, list[float]] = {side: [] for side in SIDES}
    for r in range(spec["rounds"]):
        for side in rotated(list(SIDES), r):
            seconds[side].append(step(side))
    tps = {side: [tokens / s for s in seconds[side]] for side in SIDES}
    return {
        "tokens_per_step": tokens,
        "micro_batch_size": cfg.learner.micro_batch_size,
        "tis_cap": cfg.learner.loss.tis_cap,
        "sides": {side: {"tokens_per_s": summary(tps[side]), "seconds": seconds[side]} for side in SIDES},
        "ratio": ratio_summary(tps["grpo-ray"], tps["plain PEFT"]),
        "ratio_unshared": ratio_summary(tps[UNSHARED], tps["plain PEFT"]),
        "sharing_speedup": ratio_summary(tps["grpo-ray"], tps[UNSHARED]),
    }


def markdown(section: dict[str, Any]) -> list[str]:
    goal = section["goal"]
    lines = [
        "## 4. Learner efficiency (Learner.train_step vs plain PEFT forward + backward)",
        "",
        f"Goal: >= {goal:.1f}x. Same model, LoRA, batch and micro-batches; tokens = prompt + completion tokens "
        "of the step (what a plain forward processes). 'prompt sharing off' is grpo-ray with "
        "learner.share_prompt_forward=false: every row runs its own prompt.",
        "",
        "| base | side | tokens/s | ratio vs plain | goal |",
        "|---|---|---|---|---|",
    ]
    ratio_keys = {"grpo-ray": "ratio", UNSHARED: "ratio_unshared"}
    for quantization, v in section["variants"].items():
        base = "NF4 + LoRA" if quantization == "nf4" else "plain LoRA"
        for side in SIDES:
            tps = fmt_range(v["sides"][side]["tokens_per_s"], 1)
            if side in ratio_keys:
                ratio = v[ratio_keys[side]]
                lines.append(
                    f"| {base} | {side} | {tps} | {fmt_range(ratio, 3, unit='x')} | {goal_check(ratio['median'], goal)} |"
                )
            else:
                lines.append(f"| {base} | {side} | {tps} | | |")
    lines += [
        "",
        "Prompt sharing alone (grpo-ray / grpo-ray with sharing off, same run): "
        + ", ".join(
            f"{q} {fmt_range(v['sharing_speedup'], 2, unit='x')}" for q, v in section["variants"].items()
        )
        + ".",
    ]
    return lines


if __name__ == "__main__":
    child_main({"efficiency": efficiency_child})
