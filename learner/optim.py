"""How the learner turns accumulated gradients into a step: AdamW, global-norm clipping, linear warm-up.

`LocalUpdater` is the single-process path. The data-parallel ranks use `learner.zero.ZeroUpdater`
(DeepSpeed); both keep the optimiser state in the same format, so checkpoints move between them.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from learner.config import LearnerConfig


class Updater(Protocol):
    def zero_grad(self) -> None: ...

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate one micro-batch's gradient; `last` marks the step's final micro-batch."""

    def step(self) -> float:
        """Clip, take the optimiser and scheduler step; returns the gradient norm before clipping."""
        ...

    def lr(self) -> float: ...

    def state_dict(self) -> dict[str, Any]:
        """{"optimizer": torch AdamW state dict over the trainable parameters, "scheduler": ...}."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def weights_loaded(self) -> None:
        """The trainable parameters were overwritten in place (an adapter was loaded)."""


def warmup(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warm = max(1, steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm))


class LocalUpdater:
    """One process: torch AdamW over the trainable parameters."""

    def __init__(self, params: list[torch.nn.Parameter], cfg: LearnerConfig) -> None:
        self.params = params
        self.max_grad_norm = cfg.max_grad_norm
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.scheduler = warmup(self.optimizer, cfg.warmup_steps)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return float(norm)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def weights_loaded(self) -> None:
        pass
