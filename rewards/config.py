"""Reward settings: which functions score completions, how they combine, and how failures are handled.

Imports only pydantic and :mod:`rewards.builtin` (plain python), so a config is checked without torch,
and without importing user reward modules — :func:`rewards.builtin.resolve` does that in the scorer.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from grpo_ray.config_base import MAX_SECONDS, MAX_WORKERS
from rewards.base import RewardConfigError
from rewards.builtin import check_builtin_kwargs, check_function_name

# The label of the weight-0 term that decides correctness (`data.correctness`): logged only, never
# part of the reward, read back as `ScoreResult.per_term[CORRECTNESS_LABEL]` for accuracy and eval.
CORRECTNESS_LABEL = "correctness"


class RewardTerm(BaseModel):
    """One weighted reward function; the combined reward is sum over terms of weight * value."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    function: str = Field(description="Built-in name (see rewards.builtin.BUILTINS) or 'module:function'.")
    weight: float = Field(
        default=1.0,
        ge=-1e6,
        le=1e6,
        allow_inf_nan=False,
        description="Multiplier of this term in the combined reward.",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments passed to the function."
    )
    name: str | None = Field(
        default=None, min_length=1, description="Label in metrics (reward/<name>/...); defaults to function."
    )

    @field_validator("function")
    @classmethod
    def _known_function(cls, function: str) -> str:
        check_function_name(function)  # RewardConfigError is a ValueError: pydantic reports it on the field
        return function

    @model_validator(mode="after")
    def _builtin_kwargs(self) -> RewardTerm:
        check_builtin_kwargs(self.function, self.kwargs)
        return self

    @property
    def label(self) -> str:
        """The name used in metrics and error messages."""
        return self.name or self.function


class RewardsConfig(BaseModel):
    """The reward terms and the limits of the isolated scorer that runs them."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    terms: list[RewardTerm] = Field(
        min_length=1, description="Reward terms; the sample's reward is their weighted sum."
    )
    timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=MAX_SECONDS,
        allow_inf_nan=False,
        description="Time limit per sample; a batch call gets timeout_s × its size, up to batch_timeout_s.",
    )
    batch_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=MAX_SECONDS,
        allow_inf_nan=False,
        description="Cap on one batched call before it falls back to per-sample calls (bounds a hang's cost).",
    )
    max_masked_fraction: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Stop the run if any term masks more than this fraction of one batch.",
    )
    num_workers: int = Field(
        default=1, ge=1, le=MAX_WORKERS, description="Worker processes that run reward functions in parallel."
    )
    max_worker_memory_mb: int = Field(
        default=2048,
        ge=64,
        le=1 << 24,
        description="A reward worker whose resident memory exceeds this (MiB) is killed and restarted; "
        "the samples it was scoring are masked (reason 'memory').",
    )
    output_tail_kib: int = Field(
        default=64,
        ge=1,
        le=1 << 20,
        description="What reward functions print goes to RUN_DIR/reward_output.log, not the console; "
        "only the last this-many KiB of each call's output are kept there.",
    )

    @model_validator(mode="after")
    def _unique_labels(self) -> RewardsConfig:
        labels = [t.label for t in self.terms]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(
                f"reward terms need distinct names for their metrics, but {dupes} appear more than once; "
                f"give each term its own `name:`"
            )
        return self

    def with_correctness(self, function: str) -> RewardsConfig:
        """These terms plus a weight-0 term `CORRECTNESS_LABEL` running `function` (a verdict, 1.0 = correct).

        Weight 0: it never changes or masks the reward; it runs in the same isolated, time-limited
        workers as every term, so a custom `module:function` correctness works like a built-in one.
        Raises RewardConfigError if a term already uses the label.
        """
        if any(t.label == CORRECTNESS_LABEL for t in self.terms):
            raise RewardConfigError(
                f"the reward term name {CORRECTNESS_LABEL!r} is reserved for data.correctness's accuracy "
                "term; give that term another `name:`"
            )
        term = RewardTerm(function=function, weight=0.0, name=CORRECTNESS_LABEL)
        return self.model_copy(update={"terms": [*self.terms, term]})
