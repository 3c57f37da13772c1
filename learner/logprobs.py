"""Per-token logprobs of completions under the learner's model.

Two layouts of a micro-batch, one interface (`scoring_outputs`):

* `PackedSequences`: every row is its prompt + completion, right-padded: the plain way.
* `PromptSharedSequences`: each distinct prompt runs through the model once, and the completions
  sampled from it continue from its KV cache. A GRPO group's G completions share one prompt, so this
  saves G-1 prompt forwards (and their backward) per group. Gradients flow through the shared cache
  into the prompt's forward, so the result is the same function of the weights as the plain layout.

Two ways to score, one result (`completion_logprobs`): chunked (the learner's default) runs the model
with its output layer swapped for the identity, so the forward ends at the final hidden states, and
learner/chunked_logprobs.py applies the output layer, log-softmax and gather a chunk of tokens at a
time; unchunked (chunk_tokens 0) takes the [B, T, V] logits from the model, as a plain forward does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from learner.chunked_logprobs import chunked_token_logprobs
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
        return _length_mask(self.completion_lens_B, self.completion_ids_B_T.shape[1])

    def scoring_outputs(self, model: Any) -> torch.Tensor:
        """[B, T, D] model outputs that score completion token t of row b: those at position
        prompt_len_b - 1 + t (D = vocab for logits, hidden size while the output layer is the identity)."""
        logits_B_L_V = model(input_ids=self.input_ids_B_L, attention_mask=self.attention_mask_B_L).logits
        steps_T = torch.arange(self.completion_ids_B_T.shape[1], device=logits_B_L_V.device)
        positions_B_T = (self.prompt_lens_B[:, None] - 1 + steps_T[None, :]).clamp(
            max=logits_B_L_V.shape[1] - 1
        )
        vocab = logits_B_L_V.shape[-1]
        return logits_B_L_V.gather(1, positions_B_T[..., None].expand(-1, -1, vocab))


@dataclass
class PromptSharedSequences:
    """Distinct prompts (right-padded, U rows) and the completions that continue them (B rows)."""

    prompt_ids_U_P: torch.Tensor
    prompt_lens_U: torch.Tensor
    owner_B: torch.Tensor  # the prompt row each completion continues
    completion_ids_B_T: torch.Tensor
    completion_lens_B: torch.Tensor

    @property
    def completion_mask_B_T(self) -> torch.Tensor:
        return _length_mask(self.completion_lens_B, self.completion_ids_B_T.shape[1])

    def scoring_outputs(self, model: Any) -> torch.Tensor:
        """[B, T, D] as `PackedSequences.scoring_outputs`: the prompt forward (keeping its cache), then
        the completions attend to that cache.

        Prompts are right-padded, so the cache has masked slots between a short prompt and its
        completion; completion positions are given explicitly (prompt_len + t), so rotary embeddings
        see the same positions as an unpadded sequence. Right padding also means no query row is fully
        masked, which would put NaNs into the cache.
        """
        width_P = self.prompt_ids_U_P.shape[1]
        width_T = self.completion_ids_B_T.shape[1]
        prompt_mask_U_P = _length_mask(self.prompt_lens_U, width_P).long()
        last_U = self.prompt_lens_U - 1
        # Only the last prompt position's logits are needed: with a 150k vocabulary the full prompt
        # logits would be the largest tensor of the step.
        keep = torch.unique(last_U)
        prompt_out = model(
            input_ids=self.prompt_ids_U_P,
            attention_mask=prompt_mask_U_P,
            use_cache=True,
            logits_to_keep=keep,
        )
        slot_U = torch.searchsorted(keep, last_U)
        first_U_V = prompt_out.logits[torch.arange(len(last_U), device=keep.device), slot_U]

        first_B_1_V = first_U_V[self.owner_B][:, None, :]
        if width_T == 1:
            return first_B_1_V
        cache = prompt_out.past_key_values
        cache.batch_select_indices(self.owner_B)  # differentiable: gradients sum back per prompt
        # The last completion token scores nothing, so it is not fed.
        inputs_B_T1 = self.completion_ids_B_T[:, :-1]
        steps_T1 = torch.arange(width_T - 1, device=self.owner_B.device)
        out = model(
            input_ids=inputs_B_T1,
            attention_mask=torch.cat(
                [prompt_mask_U_P[self.owner_B], self.completion_mask_B_T[:, :-1].long()], dim=1
            ),
            position_ids=self.prompt_lens_U[self.owner_B][:, None] + steps_T1[None, :],
            past_key_values=cache,
            use_cache=True,
        )
        # Token 0 is scored by the prompt's last position; token t > 0 by completion position t - 1.
        return torch.cat([first_B_1_V, out.logits], dim=1)


def pack(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int, device: str | torch.device
) -> PackedSequences:
    total = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    input_ids = torch.full((len(prompts), total), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), total), dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        sequence = prompt + completion
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention[row, : len(sequence)] = 1
    return PackedSequences(
        input_ids_B_L=input_ids.to(device),
        attention_mask_B_L=attention.to(device),
        prompt_lens_B=torch.tensor([len(p) for p in prompts], device=device),
        completion_lens_B=torch.tensor([len(c) for c in completions], device=device),
        completion_ids_B_T=_right_padded(completions, pad_id).to(device),
    )


def pack_sharing_prompts(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int, device: str | torch.device
) -> PromptSharedSequences:
    """Rows with identical prompt tokens share one prompt row (whatever their order)."""
    distinct: dict[tuple[int, ...], int] = {}
    owner = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    if any(not p for p in distinct):
        raise ValueError("every sequence needs at least one prompt token to score its first completion token")
    unique = [list(p) for p in distinct]
    return PromptSharedSequences(
        prompt_ids_U_P=_right_padded(unique, pad_id).to(device),
        prompt_lens_U=torch.tensor([len(p) for p in unique], device=device),
        owner_B=torch.tensor(owner, device=device),
        completion_ids_B_T=_right_padded(completions, pad_id).to(device),
        completion_lens_B=torch.tensor([len(c) for c in completions], device=device),
    )


def completion_logprobs(
    model: Any,
    packed: PackedSequences | PromptSharedSequences,
    temperature: float,
    with_entropy: bool = False,
    chunk_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logprobs_B_T, entropy_B_T or None) of each completion token given everything before it, at
    the sampling temperature, float32.

    chunk_tokens > 0: from the final hidden states, chunk_tokens scored tokens at a time
    (learner/chunked_logprobs.py); padding positions are not scored and hold 0. chunk_tokens 0: the
    whole [B, T, V] logits at once. `model` is the policy (a PEFT model), a DeepSpeed engine around
    it, or a plain transformers causal LM.
    """
    if chunk_tokens > 0:
        return _chunked(model, packed, temperature, with_entropy, chunk_tokens)
    logits_B_T_V = packed.scoring_outputs(model).float() / temperature
    logprobs_B_T = (
        torch.log_softmax(logits_B_T_V, dim=-1).gather(-1, packed.completion_ids_B_T[..., None]).squeeze(-1)
    )
    entropy_B_T = _entropy_by_row(logits_B_T_V.detach()) if with_entropy else None
    return logprobs_B_T, entropy_B_T


def _chunked(
    model: Any,
    packed: PackedSequences | PromptSharedSequences,
    temperature: float,
    with_entropy: bool,
    chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    with output_layer_as_identity(model) as output_layer:
        hidden_B_T_H = packed.scoring_outputs(model)
    mask_B_T = packed.completion_mask_B_T
    logprobs_N, entropy_N = chunked_token_logprobs(
        hidden_B_T_H[mask_B_T],
        output_layer,
        packed.completion_ids_B_T[mask_B_T],
        temperature,
        chunk_tokens,
        with_entropy,
    )
    zeros_B_T = torch.zeros(mask_B_T.shape, dtype=torch.float32, device=mask_B_T.device)
    logprobs_B_T = zeros_B_T.masked_scatter(mask_B_T, logprobs_N)
    entropy_B_T = zeros_B_T.masked_scatter(mask_B_T, entropy_N) if entropy_N is not None else None
    return logprobs_B_T, entropy_B_T


def causal_lm(model: Any) -> Any:
    """The transformers causal LM inside a DeepSpeed engine (`.module`) and/or a PEFT model."""
    inner = getattr(model, "module", model)
    get_base_model = getattr(inner, "get_base_model", None)
    return get_base_model() if get_base_model is not None else inner


@contextmanager
def output_layer_as_identity(model: Any) -> Iterator[torch.nn.Linear]:
    """While open, `model(...)`'s `.logits` are the final (post-norm) hidden states: the output layer
    is swapped for the identity, so no [tokens x vocab] tensor is made. Yields the output layer.

    Swapping the module (rather than calling the decoder directly) keeps every forward going through
    `model` itself, which a DeepSpeed engine needs: it hooks the backward on its forward's outputs.
    """
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(
            f"chunked log-probabilities need a plain linear output layer, found {type(head).__name__}: "
            "set learner.logprob_chunk_tokens: 0, or leave lm_head out of learner.lora.target_modules"
        )
    name = next((n for n, m in lm.named_children() if m is head), None)
    if name is None:
        raise ValueError(
            f"{type(lm).__name__}'s output layer is not one of its direct children, so it cannot be "
            "swapped out for chunked log-probabilities: set learner.logprob_chunk_tokens: 0"
        )
    setattr(lm, name, torch.nn.Identity())
    try:
        yield head
    finally:
        setattr(lm, name, head)


def _right_padded(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    out = torch.full((len(rows), max(1, max(len(r) for r in rows))), pad_id, dtype=torch.long)
    for k, row in enumerate(rows):
        out[k, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _length_mask(lengths_B: torch.Tensor, width: int) -> torch.Tensor:
    steps = torch.arange(width, device=lengths_B.device)
    return steps[None, :] < lengths_B[:, None]


@torch.no_grad()
def _entropy_by_row(logits_B_T_V: torch.Tensor) -> torch.Tensor:
    # A metric only: one row at a time keeps its float32 temporaries B times smaller (with a 150k
    # vocabulary they would otherwise be the learner's largest allocation).
    return torch.stack([entropy_from_logits(row) for row in logits_B_T_V])
