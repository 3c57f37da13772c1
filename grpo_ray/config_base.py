"""The base class of every config section; pydantic only, so configs validate without torch, vLLM or Ray."""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

# Upper bounds no real run reaches: they turn a typo (an extra zero, 2**63) into a config error
# at load instead of an overflow or an allocation failure minutes later.
MAX_TOKENS = 1 << 22  # 4M tokens: beyond any model's context window
MAX_WORKERS = 4096  # processes / actors of one kind
MAX_COUNT = 1 << 30  # steps, prompts, samples
MAX_SECONDS = 7 * 24 * 3600.0  # one week: any longer time limit is no limit


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, values are checked on assignment, no
    float may be inf or NaN (`.inf` parses as YAML, but no setting means anything at infinity), and
    a boolean is not a number (pydantic would read `max_staleness: true` as 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            kinds = set(get_args(annotation)) | {annotation}
            if bool not in kinds and kinds & {int, float}:
                raise ValueError(f"{str(value).lower()} is a boolean, but this setting is a number")
        return value
