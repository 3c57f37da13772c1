"""Held-out accuracy over wall time from launch: the demo (`grpo-ray train configs/demo.yaml`) vs TRL's
GRPOTrainer on the same model, data and step, over several seeds; and each run's time to +15 points.

    flock /work/bench.lock .venv/bin/python -m benchmarks.time_to_accuracy            # 3 seeds x 30 steps
    .venv/bin/python -m benchmarks.time_to_accuracy --quick                           # 1 seed, 2 steps

Each run is a fresh child process; the clock starts when that process starts (the interpreter's own
start-up counts), so "launch" is what a user sees after typing the command. The sides alternate per
seed (grpo-ray first for seed 0, TRL first for seed 1, ...).

Both sides: configs/demo.yaml's model (assets/tiny-qwen2, NF4 + LoRA r16/alpha 32 on all linear
layers, float32), its train prompts (chat template applied the same way; TRL draws its own order), 16
prompts x 8 completions per step, max 8 new tokens, temperature 1, beta 0, clip 0.2 / 0.28, token-
level loss, lr 2e-3, the numeric_match reward. Held-out accuracy is greedy pass@1 on the demo's 300
held-out questions: grpo-ray's own evaluation (`eval_every`), TRL's through `model.generate` on the
same prompt token ids, scored by the same function.

A third side, "grpo-ray warm", is the same run started from a warm pool (`grpo-ray warm up demo
seed=S`, cluster/warm_pool): the engines and the learner were started before the command, as a
`trl vllm-serve` server is for TRL's server mode. The pool's own start is not on the axis (it is
printed); it is stopped after its run, so it never shares the machine with the other sides' runs.
The cold "grpo-ray" side sets `warm_pool=false`, so a pool of the user's own is never picked up.

The time axis leaves out the evaluations the benchmark adds (every `--eval-every` steps, both sides),
so they cost neither side; grpo-ray's step-0 and final evaluations are part of `grpo-ray train`
and stay in. "+15 points" is the run's own step-0 accuracy + 0.15.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import (
    DEFAULT_OUT,
    DEMO_CONFIG,
    ROOT,
    Settings,
    child_env,
    child_main,
    machine_cores,
    machine_info,
    rotated,
    run_child,
)
from grpo_ray.spans import process_start_time

GAIN = 0.15  # "+15 points" of held-out accuracy over the run's own step 0
SIDES = ("grpo-ray", "grpo-ray warm", "trl")
WARM = "grpo-ray warm"


# ---- children --------------------------------------------------------------------------------------


def grpo_ray_child(spec: dict[str, Any]) -> dict[str, Any]:
    """`cluster.driver.run` on the demo config, as `grpo-ray train` runs it; evaluations timed."""
    origin = process_start_time()
    from cluster import driver
    from cluster.config import load_config
    from cluster.data.evaluate import EvalRound
    from cluster.step_loop import StepLoop

    cfg = load_config(DEMO_CONFIG, _grpo_overrides(spec))
    curve: list[dict[str, float]] = []
    added = 0.0  # seconds of the evaluations the benchmark adds (eval_every), left out of the time axis
    done_at: dict[int, float] = {}  # step -> when its added evaluation was in, on the time axis
    queue_round, finish = StepLoop._eval_round, EvalRound.finish

    # The run's own evaluations (step 0's, which runs on the workers while the learner trains step
    # 1, and the final one) stay as `grpo-ray train` runs them. The ones eval_every adds are made
    # blocking here, on an idle pipeline, and their time is taken off the axis, as on TRL's side.
    def blocking_round(self: StepLoop, step: int) -> Any:
        nonlocal added
        if step == 0:
            return queue_round(self, step)
        while self.pool.busy or self.pool.queue.waiting:  # the run's own work first, not timed
            self.pool.dispatch()
            self.pool.wait()
        begin = time.time()
        round_ = queue_round(self, step)
        while round_ is not None and not round_.complete():
            self.pool.dispatch()
            self.pool.wait()
        added += time.time() - begin
        done_at[step] = time.time() - origin - added
        return round_

    def timed_finish(self: EvalRound, scorer: Any, out_dir: Path, tag: str) -> dict[str, float]:
        values = finish(self, scorer, out_dir, tag)
        step = int(tag.removeprefix("step_"))
        at = done_at.get(step, time.time() - origin - added)
        curve.append({"step": step, "t_s": at, "accuracy": values["eval/accuracy"]})
        return values

    StepLoop._eval_round = blocking_round  # type: ignore[method-assign]
    EvalRound.finish = timed_finish  # type: ignore[method-assign]
    driver.run(cfg, echo=print)
    end = time.time()
    startup = json.loads((cfg.run_dir / "startup.json").read_text())
    return {
        "curve": curve,
        "total_s": end - origin - added,
        "first_step_s": startup["marks_s"]["first step"],
        "added_eval_s": added,
        "startup": startup,
    }


def trl_child(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL 1.16 GRPOTrainer on the same model, prompts and step (HF generation; see the module doc)."""
    origin = process_start_time()
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from cluster.config import load_config
    from cluster.data.prompts import load_split
    from rewards.builtin import BUILTINS

    cfg = load_config(DEMO_CONFIG, _grpo_overrides(spec))
    torch.set_num_threads(machine_cores())
    model = str(cfg.resolve_path(cfg.model))
    tokenizer = AutoTokenizer.from_pretrained(model)
    train = load_split(cfg.data, "train", cfg.seed, tokenizer)
    held = load_split(cfg.data, "eval", cfg.seed, tokenizer)
    assert train is not None and held is not None
    held_out = sorted(held.prompts, key=lambda p: p.index)[: cfg.data.eval_max_prompts]
    rows = [
        {
            "prompt": [
                {
                    "role": "user",
                    "content": cfg.data.user_template.format(question=p.row[cfg.data.question_field]),
                }
            ],
            "gold": p.row["gold"],
        }
        for p in train.prompts[: cfg.steps * cfg.prompts_per_step * 2]
    ]
    micro = cfg.learner.micro_batch_size
    loss = cfg.learner.loss
    args = GRPOConfig(
        output_dir=f"{spec['tmp_dir']}/trl",
        max_steps=cfg.steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=cfg.prompts_per_step * cfg.group_size // micro,
        num_generations=cfg.group_size,
        max_completion_length=cfg.rollout.sampling.max_new_tokens,
        temperature=cfg.rollout.sampling.temperature,
        top_p=1.0,
        top_k=0,
        beta=loss.beta,
        num_iterations=1,
        epsilon=loss.clip_low,
        epsilon_high=loss.clip_high,
        scale_rewards="group",
        loss_type="dapo",
        learning_rate=cfg.learner.learning_rate,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=cfg.learner.max_grad_norm,
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        model_init_kwargs={"dtype": torch.float32, "device_map": "cpu"},
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=cfg.seed,
    )
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=cfg.learner.double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    lora = LoraConfig(
        r=cfg.learner.lora.rank,
        lora_alpha=int(cfg.learner.lora.alpha),
        lora_dropout=0.0,
        target_modules=cfg.learner.lora.module_names(),
        bias="none",
        task_type="CAUSAL_LM",
    )

    def numeric_match(completions: list[Any], gold: list[str], **_: Any) -> Any:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return BUILTINS["numeric_match"](texts, [{"gold": g} for g in gold])

    curve: list[dict[str, float]] = []
    added = 0.0

    def held_out_accuracy(policy: Any) -> float:
        """Greedy pass@1 on the held-out prompts' token ids (left-padded batches of 100)."""
        was_training = policy.training
        policy.eval()
        texts: list[str] = []
        with torch.no_grad():
            for start in range(0, len(held_out), 100):
                batch = held_out[start : start + 100]
                padded = tokenizer.pad(
                    {"input_ids": [p.token_ids for p in batch]}, padding=True, return_tensors="pt"
                )
                out = policy.generate(
                    **padded,
                    do_sample=False,
                    max_new_tokens=cfg.rollout.sampling.max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                )
                texts.extend(
                    tokenizer.batch_decode(out[:, padded["input_ids"].shape[1] :], skip_special_tokens=True)
                )
        policy.train(was_training)
        verdicts = BUILTINS["numeric_match"](texts, [p.row for p in held_out])
        return sum(v == 1.0 for v in verdicts) / len(verdicts)

    class Evaluate(TrainerCallback):
        def _eval(self, step: int, policy: Any) -> None:
            nonlocal added
            begin = time.time()
            accuracy = held_out_accuracy(policy)
            end = time.time()
            added += end - begin
            # the point is placed where training stood when the evaluation began
            curve.append(
                {"step": step, "t_s": begin - origin - (added - (end - begin)), "accuracy": accuracy}
            )

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._eval(0, kwargs["model"])

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step % spec["eval_every"] == 0 or state.global_step == cfg.steps:
                self._eval(state.global_step, kwargs["model"])

    tokenizer.padding_side = "left"
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=numeric_match,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
        quantization_config=quantization,
        callbacks=[Evaluate()],
    )
    policy: Any = trainer.model
    for param in policy.parameters():  # float32 adapter, as grpo-ray's learner keeps it
        if param.requires_grad:
            param.data = param.data.float()
    for module in policy.modules():  # bitsandbytes' bf16 repack off, as learner/model.py does
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    trainer.train()
    end = time.time()
    return {"curve": curve, "total_s": end - origin - added, "added_eval_s": added}


def _grpo_overrides(spec: dict[str, Any]) -> list[str]:
    return [
        *([] if spec.get("warm") else ["warm_pool=false"]),
        f"seed={spec['seed']}",
        f"steps={spec['steps']}",
        f"eval_every={spec['eval_every']}",
        f"run_root={spec['tmp_dir']}/runs",
        "name=demo",
        "logging.progress_bar=false",
    ]


# ---- the comparison --------------------------------------------------------------------------------


def time_to_gain(curve: list[dict[str, float]], gain: float = GAIN) -> float | None:
    """Seconds from launch to the first evaluation at or above step 0's accuracy + `gain` (None: never)."""
    base = next(p["accuracy"] for p in curve if p["step"] == 0)
    # accuracies are k/300 and base + gain is rounded once (~1e-16): 1e-12 keeps an exact hit a hit
    hit = next(
        (p["t_s"] for p in sorted(curve, key=lambda p: p["t_s"]) if p["accuracy"] >= base + gain - 1e-12),
        None,
    )
    return hit


def run(seeds: list[int], steps: int, eval_every: int, out_dir: Path, timeout_s: float) -> dict[str, Any]:
    settings = Settings(
        quick=False,
        repeats=len(seeds),
        warmup_steps=0,
        timed_steps=steps,
        out_dir=out_dir,
        log_dir=out_dir / "logs",
        model=ROOT / "assets" / "tiny-qwen2",
        big_model=ROOT / "assets" / "tiny-qwen2",
        trl=True,
        big=False,
        child_timeout_s=timeout_s,
        cores=machine_cores(),
    )
    kinds = {"grpo-ray": "grpo_ray", WARM: "grpo_ray", "trl": "trl"}
    results = {"machine": machine_info(), "steps": steps, "eval_every": eval_every, "gain": GAIN}
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    for r, seed in enumerate(seeds):
        for side in rotated(SIDES, r):
            spec = {"kind": kinds[side], "seed": seed, "steps": steps, "eval_every": eval_every}
            label = f"tta-{side.replace(' ', '-')}-seed{seed}"
            if side == WARM:
                with warm_pool(seed, settings.log_dir / f"{label}-warm-up.log") as (env, warm_up_s):
                    result = run_child(
                        "time_to_accuracy", {**spec, "warm": True, "env": env}, settings, label
                    )
                result["warm_up_s"] = warm_up_s
            else:
                result = run_child("time_to_accuracy", spec, settings, label)
            result["seed"] = seed
            result["time_to_gain_s"] = time_to_gain(result["curve"])
            runs[side].append(result)
            print(f"{side} seed {seed}: {_describe(result)}", flush=True)
            _write(out_dir, {**results, "runs": runs})  # what is done so far, in case the rest is cut short
    return {**results, "runs": runs}


@contextmanager
def warm_pool(seed: int, log: Path) -> Iterator[tuple[dict[str, str], float]]:
    """A warm pool for the demo at `seed` in a cache directory of its own (the prompt-token cache
    shared with the other sides); yields (the environment that finds it, seconds it took to start).
    Stopped on exit, before its spares refill."""
    from grpo_ray.cache_dir import cache_root

    with tempfile.TemporaryDirectory(prefix="grpo-bench-warm-") as cache:
        shared = cache_root()
        if shared is not None:
            (shared / "prompt-tokens").mkdir(parents=True, exist_ok=True)
            (Path(cache) / "prompt-tokens").symlink_to(shared / "prompt-tokens")
        env = {**child_env(), "GRPO_RAY_CACHE_DIR": cache}
        cli = [sys.executable, "-m", "cluster.cli", "warm"]
        begin = time.perf_counter()
        with log.open("w") as out:
            subprocess.run([*cli, "up", "demo", f"seed={seed}"], env=env, stdout=out, stderr=out, check=True)
        try:
            yield {"GRPO_RAY_CACHE_DIR": cache}, time.perf_counter() - begin
        finally:
            with log.open("a") as out:
                subprocess.run([*cli, "down"], env=env, stdout=out, stderr=out, check=False)


def _write(out_dir: Path, results: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "time_to_accuracy.json").write_text(json.dumps(results, indent=1))
    (out_dir / "time_to_accuracy.md").write_text(markdown(results))


def _describe(result: dict[str, Any]) -> str:
    curve = result["curve"]
    hit = result["time_to_gain_s"]
    first = f", first step at {result['first_step_s']:.1f} s" if "first_step_s" in result else ""
    if "warm_up_s" in result:
        first += f" (pool warmed up beforehand in {result['warm_up_s']:.0f} s, not on the axis)"
    return (
        f"held-out {curve[0]['accuracy']:.3f} -> {curve[-1]['accuracy']:.3f}, "
        f"+{GAIN * 100:.0f} points at {'never' if hit is None else f'{hit:.1f} s'}, "
        f"total {result['total_s']:.1f} s{first}"
    )


def markdown(results: dict[str, Any]) -> str:
    runs = results["runs"]
    lines = [
        "## Time to accuracy: the demo vs TRL GRPOTrainer (held-out greedy pass@1, wall time from launch)",
        "",
        f"{results['steps']} steps, evaluated every {results['eval_every']} (evaluation time left out of the "
        "axis on both sides), seeds alternating sides; the machine is shared with other engineers' jobs.",
        "",
        "| side | seed | step 0 | final | time to +15 points | total | first step |",
        "|---|---|---|---|---|---|---|",
    ]
    for side in SIDES:
        for r in runs[side]:
            hit = r["time_to_gain_s"]
            lines.append(
                f"| {side} | {r['seed']} | {r['curve'][0]['accuracy']:.3f} | {r['curve'][-1]['accuracy']:.3f} | "
                f"{'never' if hit is None else f'{hit:.1f} s'} | {r['total_s']:.1f} s | "
                f"{_seconds(r.get('first_step_s'))} |"
            )
    lines.append("")
    for side in (side for side in SIDES if runs[side]):
        hits = [r["time_to_gain_s"] for r in runs[side]]
        reached = [h for h in hits if h is not None]
        median = (
            f"{statistics.median(reached):.1f} s"
            if len(reached) == len(hits)
            else f"{len(reached)}/{len(hits)} reached"
        )
        total = statistics.median(r["total_s"] for r in runs[side])
        warm_up = (
            f" (the pool's own start beforehand, not on the axis: median "
            f"{statistics.median(r['warm_up_s'] for r in runs[side]):.0f} s)"
            if side == WARM
            else ""
        )
        lines.append(f"- {side}: median time to +15 points {median}; median total {total:.1f} s{warm_up}")
    lines.append("")
    lines.append("Accuracy curves (t s: accuracy):")
    for side in SIDES:
        for r in runs[side]:
            points = ", ".join(f"{p['t_s']:.0f}: {p['accuracy']:.2f}" for p in r["curve"])
            lines.append(f"- {side} seed {r['seed']}: {points}")
    return "\n".join(lines) + "\n"


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 steps: a smoke run of both sides")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per child process")
    args = parser.parse_args()
    seeds, steps, eval_every = ([0], 2, 1) if args.quick else (args.seeds, args.steps, args.eval_every)
    print(markdown(run(seeds, steps, eval_every, args.out, args.timeout_s)))


if __name__ == "__main__":
    if "--spec" in sys.argv:
        child_main({"grpo_ray": grpo_ray_child, "trl": trl_child})
    else:
        main()
