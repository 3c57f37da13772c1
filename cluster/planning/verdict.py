"""The verdict: device bytes per phase, the budget table, gpu_memory_utilization, and advice.

Placement:
- `split`: learner and engine on separate devices; each must fit the device on its own.
- `colocate`: one device, two phases. Train: the learner peak + the sleeping engine's residue
  (sleep level 1 offloads weights to CPU and drops the KV cache; its CUDA context stays).
  Generate: the awake engine + the learner's resident state (weights, LoRA, grads, AdamW state,
  context) — this assumes the learner calls `torch.cuda.empty_cache()` after its step, or torch's
  caching allocator keeps the whole training peak reserved and vLLM cannot wake up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from cluster.planning.engine_memory import kv_cache_bytes, rollout_components
from cluster.planning.inputs import GiB, MemoryInputs, MiB
from cluster.planning.learner_memory import learner_components, learner_resident, logits_bytes


def phase_bytes(inputs: MemoryInputs, learner: dict[str, int], rollout: dict[str, int]) -> dict[str, int]:
    """Device bytes in use per phase; the plan fits when every phase fits the device.

    colocate: train    = learner total + the sleeping engine's context + a worker_merge packed base
                         (level-1 sleep frees the rest)
              generate = engine total + learner resident state
    split:    train    = learner total (its own device); generate = engine total (its own device)
    """
    learner_total, rollout_total = sum(learner.values()), sum(rollout.values())
    if inputs.placement == "split":
        return {"train": learner_total, "generate": rollout_total}
    return {
        # vLLM's sleep does not free a worker_merge base: it is the worker's own tensors
        "train": learner_total + rollout["context"] + rollout["packed_base"],
        "generate": rollout_total + learner_resident(learner),
    }


@dataclass(frozen=True)
class MemoryPlan:
    learner: dict[str, int]
    rollout: dict[str, int]
    learner_total: int
    rollout_total: int
    peak: int
    device_bytes: int
    gpu_memory_utilization: float
    fits: bool
    advice: list[str]
    placement: str = "colocate"
    phases: dict[str, int] = field(default_factory=dict)

    def render(self) -> str:
        """A budget table in GiB: learner and vLLM columns, the phases, peak vs device, the verdict."""
        lines = [f"memory plan ({self.placement}, device {_gib(self.device_bytes)} GiB)"]
        lines.append(f"  {'GiB':<22}{'learner':>9}{'vLLM':>9}")
        for label, lkey, rkey in _ROWS:
            if rkey == "packed_base" and not self.rollout.get(rkey):
                continue  # only sync: worker_merge keeps a base next to the engine
            left = _gib(self.learner[lkey]) if lkey else ""
            right = _gib(self.rollout[rkey]) if rkey else ""
            lines.append(f"  {label:<22}{left:>9}{right:>9}")
        lines.append(f"  {'total':<22}{_gib(self.learner_total):>9}{_gib(self.rollout_total):>9}")
        lines += self._phase_lines()
        verdict = "fits" if self.fits else "does NOT fit"
        spare = self.device_bytes - self.peak
        margin = f"{_gib(spare)} GiB spare" if spare >= 0 else f"{_gib(-spare)} GiB over"
        lines.append(
            f"  peak {_gib(self.peak)} of {_gib(self.device_bytes)} GiB "
            f"({100 * self.peak / self.device_bytes:.0f}%): {verdict}, {margin}; "
            f"vLLM gpu_memory_utilization = {self.gpu_memory_utilization:.3f}"
        )
        lines += [f"  - {item}" for item in self.advice]
        return "\n".join(lines)

    def refusal(self) -> str:
        """What `grpo-ray check` and `train` say about a plan that does not fit: the shortfall and
        the knobs, each with the bytes it frees."""
        return f"the run does not fit in {self.device_bytes / GiB:g} GiB:\n  " + "\n  ".join(self.advice)

    def _phase_lines(self) -> list[str]:
        train, generate = self.phases["train"], self.phases["generate"]
        if self.placement == "split":
            return [
                f"  learner device : {_gib(train)} GiB",
                f"  engine device  : {_gib(generate)} GiB (each engine on its own device)",
            ]
        resident = learner_resident(self.learner)
        return [
            f"  train phase    : learner {_gib(self.learner_total)} + vLLM asleep "
            f"{_gib(self.rollout['context'])} = {_gib(train)} GiB",
            f"  generate phase : vLLM {_gib(self.rollout_total)} + learner resident {_gib(resident)} "
            f"= {_gib(generate)} GiB",
        ]


_ROWS: list[tuple[str, str | None, str | None]] = [
    ("nf4 base weights", "nf4_weights", None),
    ("dense weights", "dense_weights", "weights"),
    ("packed base (worker)", None, "packed_base"),
    ("lora adapter", "lora", None),
    ("lora grads", "grads", None),
    ("adamw state", "optimizer", None),
    ("activations", "activations", None),
    ("logits", "logits", None),
    ("kv cache", None, "kv_cache"),
    ("vllm profile headroom", None, "headroom"),
    ("cuda context + slack", "overhead", "context"),
]


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def plan_memory(inputs: MemoryInputs) -> MemoryPlan:
    """The budget, the verdict, and (when it does not fit) which knobs free how much."""
    learner, rollout = learner_components(inputs), rollout_components(inputs)
    by_phase = phase_bytes(inputs, learner, rollout)
    peak = max(by_phase.values())
    fits = peak <= inputs.device_bytes
    return MemoryPlan(
        learner=learner,
        rollout=rollout,
        learner_total=sum(learner.values()),
        rollout_total=sum(rollout.values()),
        peak=peak,
        device_bytes=inputs.device_bytes,
        gpu_memory_utilization=vllm_utilization(rollout, inputs.device_bytes),
        fits=fits,
        advice=[] if fits else advice(inputs, by_phase),
        placement=inputs.placement,
        phases=by_phase,
    )


def vllm_utilization(rollout: dict[str, int], device_bytes: int) -> float:
    """(weights + KV cache + headroom) / device, rounded up to 0.001 so the planned KV cache fits.

    The context is left out: vLLM takes its baseline after creating it.
    """
    budget = rollout["weights"] + rollout["kv_cache"] + rollout["headroom"]
    return math.ceil(1000 * budget / device_bytes) / 1000


# ---- advice --------------------------------------------------------------------------------------


def _phases_of(inputs: MemoryInputs) -> dict[str, int]:
    return phase_bytes(inputs, learner_components(inputs), rollout_components(inputs))


def advice(inputs: MemoryInputs, by_phase: dict[str, int]) -> list[str]:
    """Knobs for each phase over the device, each with the bytes it frees."""
    items: list[str] = []
    if by_phase["train"] > inputs.device_bytes:
        items += _train_advice(inputs, by_phase["train"])
    if by_phase["generate"] > inputs.device_bytes:
        items += _generate_advice(inputs, by_phase["generate"])
    return items


def _train_advice(inputs: MemoryInputs, train: int) -> list[str]:
    device = inputs.device_bytes
    items = [f"the training phase needs {_gib(train)} GiB of {_gib(device)}"]
    checkpointed = replace(inputs, gradient_checkpointing=True)
    if not inputs.gradient_checkpointing:
        saved = train - _phases_of(checkpointed)["train"]
        items.append(
            f"turn on learner.gradient_checkpointing, with learner.share_prompt_forward off "
            f"(saves {_gib(saved)} GiB of activations)"
        )
    micro = _largest_fitting_micro(inputs)
    if inputs.micro_batch_size > 1:
        target = micro or 1
        saved = train - _phases_of(replace(inputs, micro_batch_size=target))["train"]
        alone = "" if micro else "; not enough on its own"
        items.append(
            f"lower learner.micro_batch_size from {inputs.micro_batch_size} to {target} "
            f"(saves {_gib(saved)} GiB{alone})"
        )
    if not inputs.gradient_checkpointing and micro is None:
        both = _largest_fitting_micro(checkpointed)
        if both:
            items.append(f"with gradient_checkpointing on, micro_batch_size {both} fits")
    items.append(_logits_advice(inputs, train))
    if inputs.quantization == "none":
        saved = train - _phases_of(replace(inputs, quantization="nf4"))["train"]
        items.append(f"set learner.quantization: nf4 (saves {_gib(saved)} GiB)")
    return items


def _logits_advice(inputs: MemoryInputs, train: int) -> str:
    logits = _gib(logits_bytes(inputs))
    if inputs.chunk_tokens == 0:
        saved = train - _phases_of(replace(inputs, logprob_chunk_tokens=None))["train"]
        return (
            f"the logits path takes {logits} GiB (micro-batch {inputs.micro_batch_size} x vocab "
            f"{inputs.shape.vocab_size} x {inputs.max_new_tokens} new tokens, mostly fp32): remove "
            f"learner.logprob_chunk_tokens: 0 to compute them in chunks (saves {_gib(saved)} GiB)"
        )
    return (
        f"the logits path takes {logits} GiB (chunks of {inputs.chunk_tokens} tokens x vocab "
        f"{inputs.shape.vocab_size}, fp32): a smaller learner.logprob_chunk_tokens shrinks it"
    )


def _largest_fitting_micro(inputs: MemoryInputs) -> int | None:
    """Largest divisor of the micro-batch size (so it still divides the step's sequences) that fits."""
    for size in range(inputs.micro_batch_size - 1, 0, -1):
        smaller = replace(inputs, micro_batch_size=size)
        if inputs.micro_batch_size % size == 0 and _phases_of(smaller)["train"] <= inputs.device_bytes:
            return size
    return None


def _generate_advice(inputs: MemoryInputs, generate: int) -> list[str]:
    device = inputs.device_bytes
    kv = kv_cache_bytes(inputs.shape, inputs.rollout_bytes, inputs.rollout_sequences, inputs.sequence_tokens)
    per_sequence = kv // inputs.rollout_sequences
    room = device - (generate - kv)
    items = [
        f"the generation phase needs {_gib(generate)} GiB of {_gib(device)}, "
        f"{_gib(kv)} GiB of it KV cache for {inputs.rollout_sequences} sequences x {inputs.sequence_tokens} tokens"
    ]
    if room >= per_sequence:
        items.append(
            f"lower prompts_per_step (or group_size) so one engine holds at most {room // per_sequence} "
            f"sequences (prompts per engine x group_size), or lower rollout.sampling.max_new_tokens / "
            f"data.max_prompt_tokens (KV cache {per_sequence / MiB:.1f} MiB per sequence)"
        )
    else:
        items.append(
            f"the engine's weights and headroom alone leave no room for one sequence's KV cache "
            f"({_gib(max(room, 0))} GiB free): use a smaller model or more devices"
        )
    if inputs.placement == "colocate":
        items.append("or use placement: split (learner and engine on separate GPUs)")
    return items
