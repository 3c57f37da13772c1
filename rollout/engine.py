"""A thin wrapper around one vLLM engine: sample groups from token ids, load new policy weights.

Everything vLLM-specific on the rollout side lives here, so a vLLM upgrade touches one file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from grpo_ray.records import Completion
from grpo_ray.spans import Spans, imports_without_gc
from rollout.config import RolloutConfig
from rollout.engine_timing import engine_phases

_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_EXTENSION = "rollout.worker_extension.GrpoWorkerExtension"


def model_eos_ids(model: str) -> list[int]:
    """Every EOS id the model's generation config and tokenizer name (Qwen-style models have two)."""
    from transformers import AutoTokenizer, GenerationConfig

    ids: list[int] = []
    try:
        eos = GenerationConfig.from_pretrained(model).eos_token_id
        ids.extend(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except OSError:
        pass  # no generation_config.json: the tokenizer's EOS below still applies
    tokenizer_eos = AutoTokenizer.from_pretrained(model).eos_token_id
    if tokenizer_eos is not None:
        ids.append(tokenizer_eos)
    return sorted(set(ids))


def engine_args(
    model: str, cfg: RolloutConfig, seed: int, cuda: bool, sleep_mode: bool = False
) -> dict[str, Any]:
    """The `vllm.LLM` arguments a rollout engine is built with (the benchmarks build bare vLLM from them)."""
    kwargs: dict[str, Any] = dict(
        model=model,
        dtype=cfg.dtype,
        seed=seed,
        max_model_len=cfg.max_model_len,
        tensor_parallel_size=cfg.tensor_parallel_size,
        enforce_eager=cfg.enforce_eager,
        enable_prefix_caching=cfg.enable_prefix_caching,
        # Processed logprobs include temperature; the learner scales its logits the same way.
        logprobs_mode="processed_logprobs",
    )
    if cuda:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        # Colocated with the learner: release weights and KV cache while it trains (CUDA only).
        kwargs["enable_sleep_mode"] = sleep_mode
    else:
        kwargs["kv_cache_memory_bytes"] = cfg.kv_cache_mb * 2**20
        # A partially prefilled request has its sampled token discarded and its seeded generator
        # rewound (`set_offset`), which CPU generators do not support: vLLM 0.32 then fails with
        # "CPU Generator does not use offset". Whole-prompt prefills never rewind.
        kwargs["enable_chunked_prefill"] = False
    return kwargs


def sampling_params(cfg: RolloutConfig, eos_ids: list[int], n: int, seed: int | None, greedy: bool) -> Any:
    """One prompt's `vllm.SamplingParams`: n samples, each sampled token's logprob, every EOS id."""
    from vllm import SamplingParams

    sampling = cfg.sampling
    return SamplingParams(
        n=n,
        temperature=0.0 if greedy else sampling.temperature,
        top_p=1.0 if greedy else sampling.top_p,
        top_k=-1 if greedy else sampling.top_k,
        max_tokens=sampling.max_new_tokens,
        stop_token_ids=eos_ids,
        logprobs=None if greedy else 0,
        seed=seed,
        skip_special_tokens=True,
    )


class RolloutEngine:
    """One vLLM `LLM` in this process, sampling with the processed (temperature-scaled) logprobs."""

    def __init__(
        self,
        model: str,
        cfg: RolloutConfig,
        seed: int,
        lora_rank: int | None = None,
        sleep_mode: bool = False,
        spans: Spans | None = None,
    ) -> None:
        # The engine must live in this process (a Ray actor) so tensors reach it without a copy.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import torch

        self.spans = spans if spans is not None else Spans()
        with self.spans.span("import vllm"), imports_without_gc():
            from vllm import LLM
        cuda = torch.cuda.is_available()
        if not cuda and cfg.enforce_eager:
            _no_compile_on_cpu()
        self.cfg = cfg
        self.eos_ids = model_eos_ids(model)
        kwargs = engine_args(model, cfg, seed, cuda=cuda, sleep_mode=sleep_mode)
        kwargs["worker_extension_cls"] = _EXTENSION
        if lora_rank is not None:
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=_vllm_lora_rank(lora_rank))
        with engine_phases(self.spans, "build engine"):
            self.llm = LLM(**kwargs)
        self._lora_request: Any = None
        self._adapter_dir = Path(tempfile.mkdtemp(prefix="grpo-ray-adapter-"))

    def generate(
        self, prompts: list[list[int]], n: int, seeds: list[int] | None = None, greedy: bool = False
    ) -> list[list[Completion]]:
        """`n` completions per prompt (token-id prompts), with each sampled token's logprob."""
        from vllm.inputs import TokensPrompt

        params = [
            sampling_params(self.cfg, self.eos_ids, n, None if seeds is None else seeds[i], greedy)
            for i in range(len(prompts))
        ]
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=self._lora_request)
        return [[_completion(sample) for sample in output.outputs] for output in outputs]

    def load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """Reload these checkpoint-named tensors in place. A generator is consumed lazily (the engine
        is in this process, so collective_rpc hands the object itself to the worker)."""
        self.llm.collective_rpc("grpo_load_weights", args=(named_tensors,))
        self._forget_cached_prompts()

    def _forget_cached_prompts(self) -> None:
        # reload_weights resets vLLM's LoRA and encoder caches but not the prefix cache: without this,
        # the next step would reuse KV blocks of shared prompt prefixes computed by the old policy.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight update")

    def load_adapter(
        self, tensors: list[tuple[str, Any]], adapter_config: dict[str, Any], version: int
    ) -> None:
        """Write the adapter locally (vLLM LoRA loads from a path) and serve it from now on."""
        import json

        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        save_file(dict(tensors), str(self._adapter_dir / "adapter_model.safetensors"))
        (self._adapter_dir / "adapter_config.json").write_text(json.dumps(adapter_config))
        # One LoRA slot, replaced in place each version; the id stays 1 so vLLM reuses the slot.
        self._lora_request = LoRARequest(f"policy-v{version}", 1, str(self._adapter_dir), load_inplace=True)
        self._forget_cached_prompts()

    def parameter_names(self) -> list[str]:
        return list(self.llm.collective_rpc("grpo_parameter_names")[0])

    def packed_modules(self) -> dict[str, list[str]]:
        return dict(self.llm.collective_rpc("grpo_packed_modules")[0])

    def sleep(self) -> None:
        """Colocate mode: offload weights to CPU and drop the KV cache while the learner trains.

        Level 1, not 2: a merged sync sends only the layers the adapter changes, so the others must
        survive the sleep.
        """
        self.llm.sleep(level=1)

    def wake_up(self) -> None:
        self.llm.wake_up()


def _no_compile_on_cpu() -> None:
    """Eager engine on CPU: turn off torch.compile in this process (the actor holds only the engine).

    With `enforce_eager` vLLM compiles no model graph, but its sampler still `torch.compile`s one
    helper (`batched_count_greater_than`, the sampled token's rank) on the first sampled step: 2-7 s
    of inductor work on this 2-core machine, for an integer count of a few hundred rows that eager
    torch computes identically in microseconds. The rank is not even used (logprobs=0).
    """
    import torch._dynamo

    torch._dynamo.config.disable = True


def _completion(sample: Any) -> Completion:
    logprobs = (
        []
        if sample.logprobs is None
        else [step[tok].logprob for tok, step in zip(sample.token_ids, sample.logprobs, strict=True)]
    )
    return Completion(
        token_ids=list(sample.token_ids),
        logprobs=logprobs,
        finish_reason=str(sample.finish_reason),
        text=sample.text,
    )


def _vllm_lora_rank(rank: int) -> int:
    for allowed in _VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest supported rank {_VLLM_LORA_RANKS[-1]}")
