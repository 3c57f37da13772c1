"""The one typed run config: sections from each component, validated at load, batch math derived.

`load_config(path, overrides)` is the only way a config enters the system. It imports no torch,
vLLM or Ray, so `grpo-ray check` answers in about a second.
"""

from __future__ import annotations

import difflib
import re
import string
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from grpo_ray.config_base import MAX_COUNT, MAX_TOKENS, Strict
from grpo_ray.shipped import CONFIGS, shipped_configs, shipped_path
from learner.config import LearnerConfig
from rewards.builtin import VERDICTS, check_correctness_name
from rewards.config import RewardsConfig
from rollout.config import RolloutConfig


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and how to fix it."""


# A run name is one plain path component: the run directory is run_root/name, and a name like '',
# '.', '..' or 'a/b' would make it run_root itself or a directory outside it.
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def _non_blank(value: str, what: str) -> str:
    if not value.strip():
        raise ValueError(f"{what} is empty")
    return value


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
    question_field: str = Field(
        "question",
        min_length=1,
        description="Row field rendered into the user message: a string, or a list of chat messages "
        "({role, content}) rendered through the chat template as they are.",
    )
    answer_field: str = Field("answer", min_length=1, description="Row field holding the gold answer.")
    gold_format: Literal["plain", "gsm8k"] = Field(
        "plain", description="How the gold is read from answer_field: as is, or the text after '####'."
    )
    system_prompt: str | None = Field(
        None,
        description="System message prepended to every prompt (a conversational row's own system "
        "message takes its place).",
    )
    user_template: str = Field(
        "{question}",
        description="User message; {question} is replaced by the row's question (in a conversational "
        "row: the content of its last user message).",
    )
    max_prompt_tokens: int = Field(
        256, ge=1, le=MAX_TOKENS, description="Prompts longer than this are dropped at load and counted."
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="A row missing a needed field: stop with its index, or skip it and count it."
    )
    correctness: str = Field(
        "numeric_match",
        description=f"What decides that an answer is correct (rollout/accuracy, eval): a built-in verdict "
        f"({', '.join(VERDICTS)}) or 'module:function' returning 1.0 for correct; run by the reward scorer.",
    )
    eval_samples: int = Field(
        0,
        ge=0,
        le=4096,
        description="k for mean@k / pass@k: samples per held-out question at the sampling temperature "
        "(0: greedy pass@1 only).",
    )
    eval_max_prompts: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="Evaluate on at most this many held-out rows."
    )
    token_cache: bool = Field(
        True,
        description="Reuse an earlier run's prompt token ids when the rendered prompts, tokenizer files "
        "and library versions match (kept in $GRPO_RAY_CACHE_DIR, else ~/.cache/grpo-ray).",
    )

    @field_validator("user_template")
    @classmethod
    def _template_has_question(cls, template: str) -> str:
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
            template.format(question="")
        except (ValueError, KeyError, IndexError, AttributeError) as err:
            raise ValueError(
                f"user_template {template!r} is not a valid template ({type(err).__name__}: {err}); use "
                "{question} for the question and double braces {{ }} for literal ones"
            ) from None
        if "question" not in fields:
            raise ValueError(
                f"user_template {template!r} has no {{question}} placeholder, so every prompt would be the "
                "same text; put {question} where the row's question goes"
            )
        return template

    @field_validator("train_files", "eval_files")
    @classmethod
    def _files_named(cls, files: list[str]) -> list[str]:
        for file in files:
            _non_blank(file, "a data file path")
        return files

    @field_validator("hub_dataset", "hub_config", "train_split", "eval_split")
    @classmethod
    def _hub_names(cls, value: str | None) -> str | None:
        return value if value is None else _non_blank(value, "this hub name")

    @field_validator("correctness")
    @classmethod
    def _known_correctness(cls, function: str) -> str:
        check_correctness_name(function)  # RewardConfigError is a ValueError: pydantic names the field
        return function

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
    wandb_project: str = Field("grpo-ray", min_length=1, description="wandb project name.")
    progress_bar: bool = Field(True, description="Show a progress bar on the driver.")


class RunConfig(Strict):
    name: str = Field(
        "run",
        description="Run name, one plain path component (letters, digits, '.', '_', '-'); the run "
        "directory is run_root/name.",
    )
    run_root: str = Field(
        "runs", min_length=1, description="Directory holding run directories (metrics, checkpoints)."
    )
    model: str = Field(description="Hugging Face hub id or local directory of the base model.")
    seed: int = Field(0, ge=0, lt=1 << 32, description="Seed for data order, sampling and LoRA init.")
    steps: int = Field(20, ge=1, le=MAX_COUNT, description="GRPO steps to run.")
    prompts_per_step: int = Field(16, ge=1, le=1 << 20, description="Prompts sampled per step.")
    group_size: int = Field(
        8, ge=2, le=1 << 16, description="Completions sampled per prompt (the GRPO group)."
    )
    sync: Literal["merged", "adapter", "worker_merge"] = Field(
        "merged",
        description="Policy sync: merged dense weights reloaded in place; the LoRA adapter via vLLM LoRA; or "
        "worker_merge (base once, then LoRA A/B; each worker merges and reloads in place).",
    )
    sync_check_every: int = Field(
        10,
        ge=0,
        le=MAX_COUNT,
        description="sync: worker_merge: every N syncs (and at the end) compare each worker's rebuilt "
        "weights' checksum with the learner's merge (0: only at the end).",
    )
    placement: Literal["split", "colocate"] = Field(
        "split",
        description="'split': learner and rollout workers on separate resources; 'colocate': one GPU.",
    )
    max_staleness: int = Field(
        0,
        ge=0,
        le=1000,
        description="Asynchronous rollouts: the rollout pool samples future steps while the learner "
        "trains, and a step trains only on groups at most this many policy versions old (0: "
        "synchronous, each step sampled by the newest policy).",
    )
    eval_every: int = Field(
        0, ge=0, le=MAX_COUNT, description="Evaluate every N steps (0: only before and after training)."
    )
    checkpoint_every: int = Field(
        0, ge=0, le=MAX_COUNT, description="Checkpoint every N steps (0: only at the end)."
    )
    keep_checkpoints: int = Field(
        2, ge=1, le=MAX_COUNT, description="How many of the newest checkpoints to keep."
    )
    max_learner_restarts: int = Field(
        2,
        ge=0,
        le=1000,
        description="Times a dead learner is restarted from the newest checkpoint before the run stops.",
    )
    resume: str = Field(
        "never",
        min_length=1,
        description="'never', 'auto' (newest complete checkpoint of this run), or a checkpoint path.",
    )
    node_labels: bool = Field(
        False,
        description="Also require the 'learner' / 'rollout' node resources cluster/cluster.yaml defines.",
    )
    gpu_memory_gib: float | None = Field(
        None,
        gt=0,
        description="Memory of each GPU the run uses (the learner's and every engine's), GiB: `train` "
        "checks the memory plan against it before starting any actor, `check` plans for it. null: "
        "colocate reads the local GPU at start; split is not checked.",
    )
    ray_address: str | None = Field(
        None,
        description="Ray cluster address ('auto': the running one); null: $RAY_ADDRESS, else a new local Ray.",
    )
    warm_pool: bool = Field(
        True,
        description="Start from the spares of a `grpo-ray warm up` pool on this machine when they are "
        "this run's actors (same settings, code and model); only runs without a Ray address.",
    )
    data: DataConfig = Field(description="Where the prompts come from and how they are rendered.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout workers and sampling.")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="QLoRA learner and GRPO loss.")
    rewards: RewardsConfig = Field(description="Reward terms and the scorer's limits.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Metrics sinks.")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not _PLAIN_NAME.match(name):
            raise ValueError(
                f"name {name!r} must be one plain directory name (letters, digits, '.', '_', '-', starting "
                "with a letter or digit; no '/', not empty): the run directory is run_root/name"
            )
        return name

    @field_validator("model")
    @classmethod
    def _model_named(cls, model: str) -> str:
        return _non_blank(model, "model (a hub id such as Qwen/Qwen2.5-0.5B-Instruct, or a local directory)")

    @field_validator("ray_address")
    @classmethod
    def _address_named(cls, address: str | None) -> str | None:
        return address if address is None else _non_blank(address, "ray_address (use null for a local Ray)")

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
        self.scored_rewards()  # a term named like the correctness term is refused here, at load
        if self.placement == "colocate" and self.learner.num_gpus > 1:
            raise ValueError(
                f"placement 'colocate' shares ONE GPU, but learner.num_gpus = {self.learner.num_gpus}; "
                "use placement 'split' for a data-parallel learner"
            )
        if self.placement == "colocate" and self.max_staleness > 0:
            raise ValueError(
                f"max_staleness = {self.max_staleness} asks the engine to sample while the learner trains, "
                "but placement 'colocate' gives their one GPU to one of them at a time; set max_staleness: 0 "
                "or use placement 'split'"
            )
        if self.max_staleness > 0 and self.learner.loss.tis_cap is None:
            raise ValueError(
                f"max_staleness = {self.max_staleness} trains on groups sampled by older policies, but "
                "learner.loss.tis_cap is null, so nothing would correct for that; set learner.loss.tis_cap "
                "(e.g. 2.0) to importance-weight them, or max_staleness: 0"
            )
        if self.placement == "colocate" and self.rollout.num_workers != 1:
            raise ValueError(
                f"placement 'colocate' shares one device between the learner and ONE engine, but "
                f"rollout.num_workers = {self.rollout.num_workers}; set it to 1 or use placement 'split'"
            )
        return self

    def scored_rewards(self) -> RewardsConfig:
        """What the reward scorer runs: rewards.terms plus data.correctness as a weight-0 term."""
        return self.rewards.with_correctness(self.data.correctness)

    @property
    def run_dir(self) -> Path:
        return Path(self.run_root) / self.name

    def resolve_path(self, path: str) -> Path:
        """A data or model path as given, else the shipped one (so shipped assets work anywhere)."""
        return resolve_project_path(path)


def resolve_project_path(path: str) -> Path:
    """`path` as given if it exists (or is absolute), else the same relative path among the shipped
    data (`assets/tiny-qwen2` in a checkout or in the installed wheel), else `path` unchanged."""
    given = Path(path).expanduser()
    if given.is_absolute() or given.exists():
        return given
    return shipped_path(given) or given


def resolve_config_path(path: str | Path) -> Path:
    """A config file: the path as given, else the same path among the shipped data
    (`configs/demo.yaml`), else a shipped config by name (`demo`). ConfigError lists the names."""
    given = Path(path).expanduser()
    if given.exists():  # a directory or unreadable file is reported by the reader, naming why
        return given
    shipped = shipped_configs()
    found = resolve_project_path(str(given)) if not given.is_absolute() else given
    if found.is_file():
        return found
    if str(path) in shipped:
        return shipped[str(path)]
    names = ", ".join(shipped) or "none found"
    raise ConfigError(
        f"config file '{path}' not found; give a YAML path or a shipped config's name ({names}; "
        f"`grpo-ray configs` lists them, in {shipped_path(CONFIGS)})"
    )


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (a path, or a shipped config's name such as `demo`), apply `a.b.c=value`
    overrides, validate; ConfigError says what to fix."""
    path = resolve_config_path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config file '{path}' is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8"
        ) from None
    except OSError as err:
        raise ConfigError(f"config file '{path}' cannot be read: {err.strerror or err}") from None
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
    parts = key.strip().split(".")
    if not sep or not all(part.strip() for part in parts):
        raise ConfigError(f"override '{override}' must look like key.path=value (e.g. learner.lora.rank=8)")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = str(getattr(err, "problem", None) or type(err).__name__)
        raise ConfigError(
            f"override '{override}': the value {text!r} is not valid YAML ({problem}); quote it to pass a "
            f"string, e.g. {key}='\"{text}\"'"
        ) from None
    except RecursionError:
        raise ConfigError(f"override '{override}': the value nests too deeply") from None
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part.strip(), {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{override}': '{part}' is a value, not a section")
        node = child
    node[parts[-1].strip()] = value


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
            shown = "" if isinstance(got, dict) else f" (got {_short(got)})"
            lines.append(f"  - '{key}': {problem['msg']}{shown}")
    return "\n".join(lines)


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


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
