"""Per-token logprobs of completions under the learner's model, batched and right-padded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from learner.grpo import entropy_from_logits


@dataclass
class PackedSequences:
    """Prompt+completion sequences right-padded into one tensor; masks come from lengths, never the pad id."""

    input_ids_B_L: torch.Tensor
    attention_mask_B_L: torch.Tensor
    prompt_lens_B: torch.Tensor
    completion_lens_B: torch.Tensor
    completion_ids_B_T: torch.Tensor

    @property
    def completion_mask_B_T(self) -> torch.Tensor:
        steps = torch.arange(self.completion_ids_B_T.shape[1], device=self.completion_lens_B.device)
        return steps[None, :] < self.completion_lens_B[:, None]


def pack(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int, device: str | torch.device
) -> PackedSequences:
    total = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    longest_completion = max(1, max(len(c) for c in completions))
    input_ids = torch.full((len(prompts), total), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), total), dtype=torch.long)
    completion_ids = torch.full((len(prompts), longest_completion), pad_id, dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        sequence = prompt + completion
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention[row, : len(sequence)] = 1
        completion_ids[row, : len(completion)] = torch.tensor(completion, dtype=torch.long)
    return PackedSequences(
        input_ids_B_L=input_ids.to(device),
        attention_mask_B_L=attention.to(device),
        prompt_lens_B=torch.tensor([len(p) for p in prompts], device=device),
        completion_lens_B=torch.tensor([len(c) for c in completions], device=device),
        completion_ids_B_T=completion_ids.to(device),
    )


def completion_logprobs(
    model: Any, packed: PackedSequences, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logprobs_B_T of each completion token given everything before it, at the sampling temperature.

    The logits at position i predict token i+1, so completion token t of row b is scored by the
    logits at prompt_len_b - 1 + t.
    """
    logits_B_L_V = model(input_ids=packed.input_ids_B_L, attention_mask=packed.attention_mask_B_L).logits
    steps_T = torch.arange(packed.completion_ids_B_T.shape[1], device=logits_B_L_V.device)
    positions_B_T = (packed.prompt_lens_B[:, None] - 1 + steps_T[None, :]).clamp(
        max=logits_B_L_V.shape[1] - 1
    )
    vocab = logits_B_L_V.shape[-1]
    logits_B_T_V = (
        logits_B_L_V.gather(1, positions_B_T[..., None].expand(-1, -1, vocab)).float() / temperature
    )
    logprobs_B_T = (
        torch.log_softmax(logits_B_T_V, dim=-1).gather(-1, packed.completion_ids_B_T[..., None]).squeeze(-1)
    )
    entropy_B_T = _entropy_by_row(logits_B_T_V.detach()) if with_entropy else None
    return logprobs_B_T, entropy_B_T


@torch.no_grad()
def _entropy_by_row(logits_B_T_V: torch.Tensor) -> torch.Tensor:
    # A metric only: one row at a time keeps its float32 temporaries B times smaller (with a 150k
    # vocabulary they would otherwise be the learner's largest allocation).
    return torch.stack([entropy_from_logits(row) for row in logits_B_T_V])
