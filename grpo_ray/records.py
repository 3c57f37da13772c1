"""The records that cross actor boundaries; nothing else does.

Plain dataclasses of Python lists and numbers (tensors only inside WeightUpdate, which travels as
raw numpy buffers), so they pickle cheaply through Ray and stay readable in tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Completion:
    """One sampled completion: tokens, the sampler's per-token logprobs, why it stopped."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (an EOS id) or "length" (hit max_new_tokens)
    text: str

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass(frozen=True)
class Group:
    """All completions for one prompt, tagged with the policy version that sampled them."""

    prompt_index: int  # index of the row in the dataset it came from
    prompt_token_ids: list[int]
    completions: list[Completion]
    policy_version: int
    worker: int


@dataclass(frozen=True)
class Batch:
    """One step's scored groups: what the learner trains on."""

    groups: list[Group]
    rewards_P_G: list[list[float | None]]  # None: reward masked (raised, timed out, NaN, ...)
    max_new_tokens: int

    def __post_init__(self) -> None:
        shapes = [len(g.completions) for g in self.groups]
        if shapes != [len(r) for r in self.rewards_P_G]:
            raise ValueError(f"rewards shape {[len(r) for r in self.rewards_P_G]} != groups {shapes}")


@dataclass(frozen=True)
class Shard:
    """One data-parallel rank's part of a Batch, with what only the whole batch determines.

    Advantages need whole groups and the loss normaliser the whole batch, so both are computed before
    the split; each rank's loss is then its exact share of the single-process loss.
    """

    groups: list[Group]  # this rank's sequences; a group's completions may be split between ranks
    advantages: list[float]  # one per sequence, in the order the groups' completions flatten to
    valid: list[bool]  # False: the reward was masked (the sequence adds nothing to the loss)
    normaliser: float  # the whole batch's loss normaliser (learner.grpo.loss_normaliser)
    micro_batches: int  # forward/backward passes every rank makes, so the gradient collectives line up


@dataclass
class WeightUpdate:
    """What a rollout worker needs to run the learner's current policy.

    mode "merged": `tensors` are dense weights under the checkpoint's parameter names, complete
    for every fused engine module they touch. mode "adapter": `tensors` is a PEFT adapter state
    dict and `adapter_config` its config, served through vLLM LoRA. mode "worker_merge": the worker
    builds the merged weights of `merge_modules` itself (grpo_ray.merge_math); `tensors` holds each
    adapted module's absolute `{module}.lora_A` [r, in] and `{module}.lora_B` [out, r] (float32),
    and, when `base_weights`, every base layer as stored by the learner: `{module}.weight` (packed
    uint8 NF4 codes with bitsandbytes' packed quantization state `{module}.weight.absmax`,
    `.quant_map`, `.nested_*`, `.quant_state.bitsandbytes__nf4`; or the dense weight) and
    `{module}.bias`. A/B are absolute, not deltas: a skipped version leaves nothing behind.
    """

    version: int
    mode: Literal["merged", "adapter", "worker_merge"]
    tensors: list[tuple[str, Any]]
    checksum: str
    adapter_config: dict[str, Any] | None = None
    base_weights: bool = False  # True when these are the base layers sent once at start
    # worker_merge only (empty otherwise):
    merge_modules: list[str] = field(default_factory=list)  # rebuilt and loaded, in this order
    keep_base: list[str] = field(default_factory=list)  # base layers the worker keeps for later syncs
    lora_scaling: dict[str, float] = field(default_factory=dict)  # module -> alpha / r
    full_check: bool = False  # the worker also reports the checksum of the weights it rebuilt

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.tensors)

    # Ray pickles with protocol 5, where numpy buffers travel out of band: written into the object
    # store once, with no copy into the pickle stream. A torch tensor is copied into the stream
    # instead: putting the 0.5B model's 1.4 GB merged update took 4.0 s that way.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["tensors"] = [(name, _to_wire(tensor)) for name, tensor in self.tensors]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["tensors"] = [(name, _from_wire(*wire)) for name, wire in state["tensors"]]
        self.__dict__.update(state)


def _to_wire(tensor: Any) -> tuple[str, tuple[int, ...], Any]:
    """(dtype name, shape, the bytes as a uint8 numpy array): numpy has no bfloat16, bytes it has."""
    import torch

    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return str(flat.dtype).removeprefix("torch."), tuple(tensor.shape), flat.view(torch.uint8).numpy()


def _from_wire(dtype: str, shape: tuple[int, ...], data: Any) -> Any:
    import torch

    # A private, writable copy: the received buffer is the object store's, shared with every other
    # reader of this update, and weight loaders must never be able to write into it.
    if data.size == 0:
        return torch.empty(shape, dtype=getattr(torch, dtype))
    return torch.from_numpy(data.copy()).view(getattr(torch, dtype)).reshape(shape)


@dataclass(frozen=True)
class SyncAck:
    """A rollout worker's receipt for a WeightUpdate."""

    worker: int
    version: int
    checksum: str
    seconds: float
    # worker_merge full check: weights_checksum of the merged weights the worker rebuilt and loaded,
    # comparable with the learner's `merged` export of the same modules (None when not asked for).
    merged_checksum: str | None = None
