"""Rollout overhead: grpo-ray's RolloutWorker vs a bare `vllm.LLM.generate`, both in a Ray actor.

Both actors live in one Ray instance with the same resources (a worker bundle's CPUs), the same
environment (cluster.placement.worker_env), the same engine arguments as rollout/engine.py
(dtype, seed, max_model_len, eager mode, prefix caching, KV cache bytes, processed logprobs,
no chunked prefill) and the
same sampling (n=8, temperature 1, top_p 1, top_k off, 64 new tokens, the model's EOS ids, one
logprob per token, the driver's per-prompt seeds). The RolloutWorker is started by
cluster.placement.start_workers with one worker, exactly as a one-worker run starts it, and receives
a policy version first (a sync of the checkpoint's own final norm weight, so both engines hold
identical weights).

Each call generates a whole step (16 prompts x 8) on one engine, timed from the caller around
`ray.get`, so the worker's bookkeeping and the return of its records through Ray count. Calls
alternate between the two actors; every round uses new prompts, as steps do.
"""

from __future__ import annotations

import os
import time
from typing import Any

from benchmarks.common import (
    WORKLOAD,
    Settings,
    bench_config,
    child_main,
    fmt_range,
    goal_check,
    local_ray,
    ratio_summary,
    rotated,
    run_child,
    summary,
    train_prompts,
)
from grpo_ray.seeds import engine_seed, prompt_seeds

GOAL = 0.95  # RolloutWorker tokens/s over bare vLLM's


class BareVLLM:
    """vLLM's offline LLM in an actor, built and sampled with the arguments RolloutEngine uses."""

    def __init__(self, model: str, cfg: Any, seed: int) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import torch
        from vllm import LLM

        from rollout.engine import engine_args, model_eos_ids

        torch.set_num_threads(cfg.threads_per_worker)
        self.cfg = cfg
        self.eos_ids = model_eos_ids(model)
        self.llm = LLM(**engine_args(model, cfg, seed, cuda=False))

    def generate(self, prompts: list[list[int]], n: int, seeds: list[int]) -> tuple[int, float]:
        """(completion tokens, seconds inside llm.generate)."""
        from vllm.inputs import TokensPrompt

        from rollout.engine import sampling_params

        params = [sampling_params(self.cfg, self.eos_ids, n, seed, greedy=False) for seed in seeds]
        begin = time.perf_counter()
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
        )
        inner = time.perf_counter() - begin
        return sum(len(sample.token_ids) for out in outputs for sample in out.outputs), inner


def run(settings: Settings) -> dict[str, Any]:
    rounds = settings.timed_steps * settings.repeats
    spec = {
        "kind": "overhead",
        "model": str(settings.model),
        "rounds": rounds,
        "cores": settings.cores,
    }
    result = run_child("rollout_overhead", spec, settings, "rollout-overhead")
    result["goal"] = GOAL
    return result


def overhead_child(spec: dict[str, Any]) -> dict[str, Any]:
    import ray
    from safetensors import safe_open

    from cluster.placement import start_workers, worker_env
    from grpo_ray.checksum import weights_checksum
    from grpo_ray.records import WeightUpdate

    model, rounds, w = spec["model"], spec["rounds"], WORKLOAD
    cfg = bench_config(model, steps=rounds + 1, run_root=spec["tmp_dir"], workers=1, cores=spec["cores"])
    prompts = [p.token_ids for p in train_prompts(model, (rounds + 1) * w.prompts_per_step)]
    with local_ray():
        workers, _group = start_workers(cfg, model)
        worker = workers[0]
        bare: Any = (
            ray.remote(BareVLLM)
            .options(num_cpus=cfg.rollout.num_cpus_per_worker, runtime_env={"env_vars": worker_env(cfg)})
            .remote(model, cfg.rollout, engine_seed(cfg.seed, 0))  # the seed worker 0's engine gets
        )
        with safe_open(f"{model}/model.safetensors", "pt") as f:
            tensors = [("model.norm.weight", f.get_tensor("model.norm.weight"))]
        ray.get(worker.load.remote(WeightUpdate(0, "merged", tensors, weights_checksum(tensors))))

        def call(side: str, step: int) -> dict[str, float]:
            chunk = prompts[step * w.prompts_per_step : (step + 1) * w.prompts_per_step]
            seeds = prompt_seeds(cfg.seed, step + 1, cfg.prompts_per_step, cfg.group_size)
            begin = time.perf_counter()
            if side == "grpo-ray":
                groups = ray.get(worker.generate.remote(list(enumerate(chunk)), w.group_size, seeds))
                seconds = time.perf_counter() - begin
                tokens = sum(len(c.token_ids) for g in groups for c in g.completions)
                return {"tokens": float(tokens), "seconds": seconds}
            tokens, inner = ray.get(bare.generate.remote(chunk, w.group_size, seeds))
            return {"tokens": float(tokens), "seconds": time.perf_counter() - begin, "inner_seconds": inner}

        sides = ["grpo-ray", "bare"]
        for side in sides:  # warm-up: first-call allocations, prompt step 0
            call(side, 0)
        calls: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
        for r in range(rounds):
            for side in rotated(sides, r):
                calls[side].append(call(side, r + 1))
    tps = {side: [c["tokens"] / c["seconds"] for c in calls[side]] for side in sides}
    return {
        "workers": 1,
        "threads_per_worker": cfg.rollout.threads_per_worker,
        "completion_tokens_per_call": summary([c["tokens"] for c in calls["grpo-ray"]]),
        "grpo-ray": {"tokens_per_s": summary(tps["grpo-ray"]), "calls": calls["grpo-ray"]},
        "bare": {
            "tokens_per_s": summary(tps["bare"]),
            "inside_generate_tokens_per_s": summary(
                [c["tokens"] / c["inner_seconds"] for c in calls["bare"]]
            ),
            "calls": calls["bare"],
        },
        "ratio": ratio_summary(tps["grpo-ray"], tps["bare"]),
    }


def markdown(section: dict[str, Any]) -> list[str]:
    ratio = section["ratio"]
    return [
        "## 2. Rollout overhead (RolloutWorker vs bare vLLM, both Ray actors)",
        "",
        f"Goal: >= {section['goal']:.2f}x. One engine, {section['threads_per_worker']} thread(s); each call is a "
        f"whole step ({fmt_range(section['completion_tokens_per_call'], 0)} completion tokens), timed around "
        "ray.get; rounds alternate the two sides.",
        "",
        "| side | tokens/s | ratio | goal |",
        "|---|---|---|---|",
        f"| RolloutWorker.generate | {fmt_range(section['grpo-ray']['tokens_per_s'], 1)} | "
        f"{fmt_range(ratio, 3, unit='x')} | {goal_check(ratio['median'], section['goal'])} |",
        f"| bare LLM.generate (actor call) | {fmt_range(section['bare']['tokens_per_s'], 1)} | | |",
        f"| bare, inside llm.generate only | {fmt_range(section['bare']['inside_generate_tokens_per_s'], 1)} | | |",
    ]


if __name__ == "__main__":
    child_main({"overhead": overhead_child})
