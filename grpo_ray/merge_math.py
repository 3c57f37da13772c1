"""The one dequant + merge arithmetic: W = dequant(W_nf4) + (alpha/r)·B·A, cast to the engine dtype.

The learner's `merged` export (learner/merge.py) and a rollout worker rebuilding the policy itself
(`sync: worker_merge`, rollout/worker_merge.py) both call these functions, so the two sides run the
same operations in the same order on the same kernels: on one device type their results are equal
bit for bit, which the worker's full check (checksum against the learner's merge) relies on.

torch and bitsandbytes are imported inside the functions: this leaf package imports nothing heavy
at import time.
"""

from __future__ import annotations

from typing import Any

# The packed quantization state bitsandbytes writes next to a 4-bit weight in a state dict
# (`QuantState.as_dict(packed=True)`): absmax, the code, the nested (double-quant) state, and one
# uint8 tensor holding the non-tensor fields (blocksize, shape, dtype, quant type, nested offset).
QUANT_STATE_PREFIX = "quant_state"


def base_float32(weight: Any, quant_state: Any = None) -> Any:
    """A base layer's weight as dense float32: bitsandbytes' own `dequantize_4bit` for a 4-bit weight
    (packed uint8 codes [n/2, 1] + its QuantState -> [out, in] in the state's dtype), else the dense
    weight upcast. A new tensor either way (`float()` of a float32 tensor is the same tensor, so
    callers never write into it)."""
    if quant_state is None:
        return weight.detach().float()
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight, quant_state).float()


def add_lora(weight_f32: Any, lora_a: Any, lora_b: Any, scaling: float) -> Any:
    """weight + scaling · B · A in float32 (A: [r, in], B: [out, r], scaling = alpha / r), new tensor.

    One addmm instead of matmul, scale and add: three passes over the weight become one.
    """
    import torch

    return torch.addmm(weight_f32, lora_b.detach().float(), lora_a.detach().float(), alpha=scaling)


def merged_weight(weight: Any, quant_state: Any, lora: tuple[Any, Any, float] | None, dtype: Any) -> Any:
    """What the engine loads for one linear: base_float32, plus the LoRA delta when `lora` = (A, B,
    scaling) is given, cast to `dtype` and made contiguous."""
    dense = base_float32(weight, quant_state)
    if lora is not None:
        dense = add_lora(dense, *lora)
    return dense.to(dtype).contiguous()


def engine_bias(bias: Any, dtype: Any) -> Any:
    """A base layer's bias as the engine loads it (biases are never quantized or adapted)."""
    return bias.detach().to(dtype).contiguous()


def pack_quant_state(name: str, quant_state: Any) -> list[tuple[str, Any]]:
    """A 4-bit weight's QuantState as plain tensors named `{name}.quant_state...` / `{name}.absmax`
    etc. (bitsandbytes' own packed serialization), so it travels like any other tensor."""
    return [(f"{name}.{key}", tensor) for key, tensor in quant_state.as_dict(packed=True).items()]


def unpack_quant_state(parts: dict[str, Any], device: Any) -> Any:
    """The QuantState `pack_quant_state` wrote, from its parts keyed without the `{name}.` prefix
    (`absmax`, `quant_map`, `quant_state.bitsandbytes__nf4`, ...), rebuilt on `device`; None when
    `parts` holds no quantization state (a dense base layer)."""
    if not any(k.startswith(QUANT_STATE_PREFIX) for k in parts):
        return None
    from bitsandbytes.functional import QuantState

    return QuantState.from_dict(dict(parts), device=device)
