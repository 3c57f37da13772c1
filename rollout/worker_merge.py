"""`sync: worker_merge` on the rollout side: keep the packed base, rebuild W = dequant(W_nf4) + (alpha/r)·B·A.

The first update (`base_weights`) brings every base layer as the learner stores it (packed NF4 codes
and quantization state, or dense); this keeps the ones later syncs rebuild (`keep_base`). Every
update brings the absolute LoRA A/B, so each sync rebuilds its modules from the kept base with
grpo_ray.merge_math, the learner's own arithmetic: nothing accumulates, a skipped version leaves no
trace. Merged weights are built one at a time and streamed into the engine's in-place reload, so
the worker never holds a second dense copy of the adapted layers. No vLLM here: unit tested alone.

Where the kept base lives (`rollout.worker_merge_base`):
- "device": on the engine's GPU. Costs device memory (~0.52 bytes/param for NF4 with double
  quantization, a quarter of bf16), taken from the KV cache; nothing moves per sync.
- "host": in the worker's host memory. Costs that much host RAM and, per sync, a host->device copy
  of the packed base (a quarter of a dense bf16 sync's bytes, over PCIe, not the network).
On a CPU engine both are host memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from grpo_ray import merge_math
from grpo_ray.checksum import ChecksumStream
from grpo_ray.records import WeightUpdate


class WorkerMergeError(RuntimeError):
    """An update this worker cannot apply (no base yet, a module it has no base for)."""


@dataclass
class _Base:
    weight: Any  # packed uint8 codes [n/2, 1], or the dense weight
    quant_state: Any  # bitsandbytes QuantState, None for a dense layer
    bias: Any  # None when the layer has none


class WorkerMerge:
    """The kept base layers of one worker and the rebuild of its merged weights.

    `store` is where the base is kept ("cpu" or "cuda"); `compute` where merges run (the engine's
    device); `dtype` the engine dtype (torch.dtype).
    """

    def __init__(self, store: str, compute: str, dtype: Any) -> None:
        self.store, self.compute, self.dtype = store, compute, dtype
        self.base: dict[str, _Base] = {}
        self.last_checksum: str | None = None  # merged checksum of the latest full-checked update

    def base_bytes(self) -> int:
        """Bytes of the kept base: codes, quantization state, biases."""
        total = 0
        for layer in self.base.values():
            tensors = [layer.weight, layer.bias]
            if layer.quant_state is not None:
                state = layer.quant_state.as_dict(packed=False)
                tensors += [v for v in state.values() if hasattr(v, "element_size")]
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return total

    def merged(self, update: WeightUpdate) -> Iterator[tuple[str, Any]]:
        """(checkpoint parameter name, merged tensor in the engine dtype) for `update.merge_modules`,
        weight then bias, in order: what the learner's `merged` export yields for the same modules.

        Raises WorkerMergeError (before yielding anything) when the update needs a base this worker
        has not received. When `update.full_check`, `last_checksum` holds, once the iterator is
        exhausted, the checksum of the kept modules' tensors among those yielded: the learner's
        `merged_checksum()`.
        """
        if update.mode != "worker_merge":
            raise WorkerMergeError(f"a '{update.mode}' update is not a worker_merge update")
        tensors = dict(update.tensors)
        incoming = self._read_base(update, tensors) if update.base_weights else {}
        if not incoming and not self.base:
            raise WorkerMergeError(
                f"policy v{update.version} carries only LoRA tensors, but this worker holds no base yet: "
                "a new or restarted worker needs a sync with the base first (the driver's include_base)"
            )
        lacking = [n for n in update.merge_modules if n not in incoming and n not in self.base]
        if lacking:  # checked before the engine's reload starts consuming, so nothing is half loaded
            raise WorkerMergeError(
                f"policy v{update.version} rebuilds {lacking[:3]}, whose base this worker lacks"
            )
        self.last_checksum = None
        return self._build(update, tensors, incoming)

    def _build(
        self, update: WeightUpdate, tensors: dict[str, Any], incoming: dict[str, _Base]
    ) -> Iterator[tuple[str, Any]]:
        digest = ChecksumStream() if update.full_check else None
        # The check covers what later syncs rebuild (on the first sync, the kept layers among all).
        checked = set(update.keep_base) if update.base_weights else set(update.merge_modules)
        for name in update.merge_modules:
            layer = incoming[name] if name in incoming else self.base[name]
            lora = None
            if name in update.lora_scaling:
                lora = (
                    tensors[f"{name}.lora_A"].to(self.compute),
                    tensors[f"{name}.lora_B"].to(self.compute),
                    update.lora_scaling[name],
                )
            weight, quant_state = layer.weight, layer.quant_state
            if self.store != self.compute:  # "host" on a GPU engine: the packed codes cross PCIe
                weight = weight.to(self.compute)
                quant_state = _moved(quant_state, self.compute)
            parts = [(f"{name}.weight", merge_math.merged_weight(weight, quant_state, lora, self.dtype))]
            if layer.bias is not None:
                parts.append(
                    (f"{name}.bias", merge_math.engine_bias(layer.bias.to(self.compute), self.dtype))
                )
            for part in parts:
                if digest is not None and name in checked:
                    digest.add(*part)
                yield part
        if update.base_weights:
            self.base = {name: incoming[name] for name in update.keep_base}
        if digest is not None:
            self.last_checksum = digest.hexdigest()

    def _read_base(self, update: WeightUpdate, tensors: dict[str, Any]) -> dict[str, _Base]:
        states: dict[str, dict[str, Any]] = {}  # module -> its quantization state's parts
        for key, tensor in tensors.items():
            module, sep, part = key.partition(".weight.")
            if sep:
                states.setdefault(module, {})[part] = tensor
        layers: dict[str, _Base] = {}
        for name in update.merge_modules:
            key = f"{name}.weight"
            if key not in tensors:
                raise WorkerMergeError(f"policy v{update.version} carries no base weight for '{name}'")
            layers[name] = _Base(
                weight=tensors[key].to(self.store),
                quant_state=merge_math.unpack_quant_state(states.get(name, {}), device=self.store),
                bias=None if f"{name}.bias" not in tensors else tensors[f"{name}.bias"].to(self.store),
            )
        missing = sorted(set(update.keep_base) - set(layers))
        if missing:
            raise WorkerMergeError(
                f"policy v{update.version} asks to keep base layers it lacks: {missing[:3]}"
            )
        return layers


def _moved(quant_state: Any, device: str) -> Any:
    """A copy of a QuantState on `device` (QuantState.to moves in place; the kept one stays put)."""
    import copy

    if quant_state is None:  # a dense base layer
        return None

    moved = copy.copy(quant_state)
    if quant_state.nested:
        moved.state2 = copy.copy(quant_state.state2)
    moved.to(device)
    return moved
