"""The one typed run config: sections from each component, validated at load, batch math derived.

`load_config(path, overrides)` is the only way a config enters the system. It imports no torch,
vLLM or Ray, so `grpo-ray check` answers in about a second.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from grpo_ray.config_base import Strict
from learner.config import LearnerConfig
from rewards.config import RewardsConfig
from rollout.config import RolloutConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and how to fix it."""


class DataConfig(Strict):
    train_files: list[str] = Field(
        default_factory=list, description="Local JSONL/Parquet/CSV files with the training prompts."
    )
    eval_files: list[str] = Field(
        default_factory=list, description="Local held-out files for evaluation (empty: no eval)."
    )
    hub_dataset: str | None = Field(
        None, description="A `datasets` hub id (e.g. openai/gsm8k) used instead of local files."
    )
    hub_config: str | None = Field(None, description="The hub dataset's config name (e.g. 'main' for gsm8k).")
    train_split: str = Field("train", description="Hub split with the training prompts.")
    eval_split: str | None = Field("test", description="Hub split held out for evaluation (null: no eval).")
    question_field: str = Field("question", description="Row field rendered into the user message.")
    answer_field: str = Field("answer", description="Row field holding the gold answer.")
    gold_format: Literal["plain", "gsm8k"] = Field(
        "plain", description="How the gold is read from answer_field: as is, or the text after '####'."
    )
    system_prompt: str | None = Field(None, description="System message prepended to every prompt.")
    user_template: str = Field(
        "{question}", description="User message; {question} is replaced by the row's question."
    )
    max_prompt_tokens: int = Field(
        256, ge=1, description="Prompts longer than this are dropped at load and counted."
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="A row missing a needed field: stop with its index, or skip it and count it."
    )
    correctness: Literal["numeric_match", "math_verify", "exact_match"] = Field(
        "numeric_match",
        description="Built-in matcher that decides whether an answer is correct (accuracy, eval).",
    )
    eval_samples: int = Field(
        0,
        ge=0,
        description="k for mean@k / pass@k: samples per held-out question at the sampling temperature "
        "(0: greedy pass@1 only).",
    )
    eval_max_prompts: int | None = Field(
        None, ge=1, description="Evaluate on at most this many held-out rows."
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if bool(self.hub_dataset) == bool(self.train_files):
            raise ValueError(
                "give the prompts either as data.train_files (local files) or as data.hub_dataset, not "
                f"{'both' if self.hub_dataset else 'neither'}"
            )
        return self


class LoggingConfig(Strict):
    wandb: bool = Field(False, description="Log metrics and the resolved config to wandb.")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="'offline' writes wandb files in the run directory and sends nothing."
    )
    wandb_project: str = Field("grpo-ray", description="wandb project name.")
    progress_bar: bool = Field(True, description="Show a progress bar on the driver.")


class RunConfig(Strict):
    name: str = Field("run", description="Run name; the run directory is run_root/name.")
    run_root: str = Field("runs", description="Directory holding run directories (metrics, checkpoints).")
    model: str = Field(description="Hugging Face hub id or local directory of the base model.")
    seed: int = Field(0, description="Seed for data order, sampling and LoRA init.")
    steps: int = Field(20, ge=1, description="GRPO steps to run.")
    prompts_per_step: int = Field(16, ge=1, description="Prompts sampled per step.")
    group_size: int = Field(8, ge=2, description="Completions sampled per prompt (the GRPO group).")
    sync: Literal["merged", "adapter"] = Field(
        "merged",
        description="Policy sync: merged dense weights reloaded in place, or the LoRA adapter via vLLM LoRA.",
    )
    placement: Literal["split", "colocate"] = Field(
        "split",
        description="'split': learner and rollout workers on separate resources; 'colocate': one GPU.",
    )
    eval_every: int = Field(
        0, ge=0, description="Evaluate every N steps (0: only before and after training)."
    )
    checkpoint_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="How many of the newest checkpoints to keep.")
    max_learner_restarts: int = Field(
        2,
        ge=0,
        description="Times a dead learner is restarted from the newest checkpoint before the run stops.",
    )
    resume: str = Field(
        "never", description="'never', 'auto' (newest complete checkpoint of this run), or a checkpoint path."
    )
    node_labels: bool = Field(
        False,
        description="Also require the 'learner' / 'rollout' node resources cluster/cluster.yaml defines.",
    )
    ray_address: str | None = Field(
        None,
        description="Ray cluster address ('auto': the running one); null: $RAY_ADDRESS, else a new local Ray.",
    )
    data: DataConfig
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout workers and sampling.")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="QLoRA learner and GRPO loss.")
    rewards: RewardsConfig
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Metrics sinks.")

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        sequences = self.prompts_per_step * self.group_size
        micro = self.learner.micro_batch_size
        if sequences % micro:
            raise ValueError(
                f"prompts_per_step × group_size = {self.prompts_per_step} × {self.group_size} = {sequences} "
                f"is not a multiple of learner.micro_batch_size = {micro}; pick a micro_batch_size that divides "
                f"{sequences} (e.g. {_largest_divisor_at_most(sequences, micro)})"
            )
        longest = self.data.max_prompt_tokens + self.rollout.sampling.max_new_tokens
        if longest > self.rollout.max_model_len:
            raise ValueError(
                f"data.max_prompt_tokens + rollout.sampling.max_new_tokens = {longest} exceeds "
                f"rollout.max_model_len = {self.rollout.max_model_len}; raise max_model_len or lower one of the two"
            )
        if self.placement == "colocate" and self.learner.num_gpus > 1:
            raise ValueError(
                f"placement 'colocate' shares ONE GPU, but learner.num_gpus = {self.learner.num_gpus}; "
                "use placement 'split' for a data-parallel learner"
            )
        if self.placement == "colocate" and self.rollout.num_workers != 1:
            raise ValueError(
                f"placement 'colocate' shares one device between the learner and ONE engine, but "
                f"rollout.num_workers = {self.rollout.num_workers}; set it to 1 or use placement 'split'"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.run_root) / self.name

    def resolve_path(self, path: str) -> Path:
        """A data or model path as given, else relative to the project (so shipped assets work anywhere)."""
        return resolve_project_path(path)


def resolve_project_path(path: str) -> Path:
    given = Path(path).expanduser()
    if given.is_absolute() or given.exists():
        return given
    shipped = PROJECT_ROOT / given
    return shipped if shipped.exists() else given


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply `a.b.c=value` overrides, validate; ConfigError says what to fix."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(
            f"config file '{path}' not found; shipped configs are in {PROJECT_ROOT / 'configs'}"
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config file '{path}' must hold a mapping at the top level, got {type(raw).__name__}"
        )
    for override in overrides or []:
        _apply_override(raw, override)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_explain(err, path)) from None


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{override}' must look like key.path=value (e.g. learner.lora.rank=8)")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{override}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(text)


def _explain(err: ValidationError, path: Path) -> str:
    lines = [f"config '{path}' has {err.error_count()} problem(s):"]
    for problem in err.errors():
        key = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        if problem["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{key}'{_suggest(problem['loc'])}")
        elif problem["type"] == "missing":
            lines.append(f"  - '{key}' is required: add it to the config")
        else:
            got = problem.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  - '{key}': {problem['msg']}{shown}")
    return "\n".join(lines)


def _suggest(loc: tuple[Any, ...]) -> str:
    model: Any = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None or not hasattr(field.annotation, "model_fields"):
            return ""
        model = field.annotation
    known = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    return f" — did you mean '{close[0]}'?" if close else f" — known keys here: {', '.join(known)}"
