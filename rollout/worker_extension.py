"""Methods vLLM mixes into its worker, reached through `LLM.collective_rpc`.

Names carry a `grpo_` prefix: an extension method must not shadow a vLLM worker method
(vLLM 0.32 already has `update_weights`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any


class _PartialReloadFilter(logging.Filter):
    """A merged sync sends only the layers the learner changes; vLLM warns about every other layer.

    Those layers keep their tensors by design (vLLM places them back), so the warning is noise. The
    learner guarantees every fused module it touches is sent whole (see learner/merge.py).
    """

    NOISE = ("Failed to load weights", "Following weights were not loaded")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage() if record.args else str(record.msg)
        return not any(noise in message for noise in self.NOISE)


for _name in (
    "vllm.model_executor.model_loader.reload.layerwise",
    "vllm.model_executor.model_loader.reload.inplace",
):
    logging.getLogger(_name).addFilter(_PartialReloadFilter())


class GrpoWorkerExtension:
    """Mixed into vLLM's Worker: `self` has `model_runner` and `reload_weights`."""

    # Defined by vLLM's Worker; an extension may not redefine any worker attribute, even as a stub.
    model_runner: Any
    reload_weights: Any

    def grpo_load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> int:
        """Load checkpoint-format weights in place (CPU repacking and fused modules handled by vLLM);
        a generator is consumed as vLLM's reload walks it. Returns how many tensors were loaded."""
        count = 0

        def counted() -> Iterator[tuple[str, Any]]:
            nonlocal count
            for item in named_tensors:
                count += 1
                yield item

        self.reload_weights(weights_iterator=counted())
        return count

    def grpo_parameter_names(self) -> list[str]:
        """The engine's own parameter names (fused: qkv_proj, gate_up_proj)."""
        # With LoRA enabled vLLM wraps linear layers; checkpoint names address the wrapped layer.
        return [
            name.replace(".base_layer.", ".") for name, _ in self.model_runner.get_model().named_parameters()
        ]

    def grpo_packed_modules(self) -> dict[str, list[str]]:
        """Which checkpoint modules the engine fuses, e.g. qkv_proj -> [q_proj, k_proj, v_proj]."""
        return dict(getattr(self.model_runner.get_model(), "packed_modules_mapping", {}) or {})
