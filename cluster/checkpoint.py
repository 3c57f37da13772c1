"""Checkpoints: written atomically by the driver, resumed from the newest complete one.

Layout of RUN_DIR/checkpoints/step_000N/:
  adapter/adapter_model.safetensors + adapter_config.json   PEFT's format (loads with PeftModel)
  learner_state.pt        optimizer, scheduler, torch RNG (loaded with weights_only=True: no pickle)
  state.json              step, policy version, data cursor, accuracy before training
  metrics.jsonl           the metrics up to this step (restored on resume)
  config.yaml             the resolved config the run had
The driver writes it (the learner may run on another node), first into a temporary directory that
is renamed into place once complete; a crash leaves only a `.partial` directory, ignored on resume.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from cluster.config import ConfigError, RunConfig

# Settings a resumed run must share with the checkpoint: changing them would train a different model.
FROZEN_KEYS = (
    "model",
    "seed",
    "group_size",
    "learner.quantization",
    "learner.double_quant",
    "learner.compute_dtype",
    "learner.lora.rank",
    "learner.lora.alpha",
    "learner.lora.dropout",
    "learner.lora.target_modules",
    "data.train_files",
    "data.question_field",
    "data.answer_field",
    "data.gold_format",
    "data.system_prompt",
    "data.user_template",
)


@dataclass
class TrainerState:
    step: int
    version: int
    cursor: int
    accuracy_before: float | None


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(
    run_dir: Path, state: TrainerState, learner_state: dict[str, Any], config_yaml: str, keep: int
) -> Path:
    import torch

    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state.step:06d}"
    work = Path(tempfile.mkdtemp(prefix=f"{final.name}.", suffix=".partial", dir=root))
    write_adapter(work / "adapter", learner_state)
    torch.save(
        {k: learner_state[k] for k in ("optimizer", "scheduler", "torch_rng")}, work / "learner_state.pt"
    )
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        shutil.copyfile(metrics, work / "metrics.jsonl")
    (work / "config.yaml").write_text(config_yaml)
    (work / "state.json").write_text(json.dumps(asdict(state)))  # last: its presence marks completeness
    if final.exists():
        shutil.rmtree(final)
    work.rename(final)
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def write_adapter(directory: Path, learner_state: dict[str, Any]) -> Path:
    """The adapter in PEFT's on-disk format, written where the driver runs (the learner may be remote)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(learner_state["adapter"], str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(learner_state["adapter_config"], indent=2))
    return directory


_CHECKPOINT_NAME = re.compile(r"^step_\d+$")


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories whose write finished (state.json present), oldest first.

    Only `step_N` names count: `.partial` work directories and `.corrupt-*` ones set aside are not.
    """
    root = checkpoint_root(run_dir)
    if not root.exists():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and _CHECKPOINT_NAME.match(p.name) and (p / "state.json").exists()
    ]
    return sorted(found, key=lambda p: p.name)


class CorruptCheckpoint(ConfigError):
    """A checkpoint directory whose files cannot be read back; the message names the file."""


Loaded = tuple[Path, TrainerState, dict[str, Any], dict[str, Any]]


def remove_partial_checkpoints(run_dir: Path, echo: Any) -> None:
    """A `.partial` directory is a save cut short (the process was killed): nothing in it is usable."""
    root = checkpoint_root(run_dir)
    for partial in sorted(root.glob("*.partial")) if root.exists() else []:
        echo(f"ignoring incomplete checkpoint {partial} (left by an interrupted write); removed it")
        shutil.rmtree(partial, ignore_errors=True)


def find_resume_point(run_dir: Path, resume: str, echo: Any) -> Path | None:
    """The checkpoint to resume from: `auto` = newest complete one (None if there is none), or a path."""
    if resume == "never":
        return None
    remove_partial_checkpoints(run_dir, echo)
    root = checkpoint_root(run_dir)
    if resume != "auto":
        path = Path(resume)
        if not (path / "state.json").exists():
            raise ConfigError(
                f"resume: '{path}' is not a complete checkpoint (no state.json); pick one under {root}"
            )
        return path
    complete = complete_checkpoints(run_dir)
    if not complete:
        echo(f"resume: auto found no checkpoint under {root}; starting from scratch")
        return None
    return complete[-1]


def load_resume_point(run_dir: Path, resume: str, echo: Any) -> Loaded | None:
    """Find and load the checkpoint to resume from; None: start from step 0.

    With `resume: auto`, a corrupt newest checkpoint (a truncated file, an empty state.json) is
    named, moved aside to `step_N.corrupt-<time>` (kept for inspection, never deleted) and the next
    newest is tried; ConfigError when none is intact. An explicitly named checkpoint that is corrupt
    is a ConfigError (the user asked for that one).
    """
    path = find_resume_point(run_dir, resume, echo)
    if path is None:
        return None
    if resume != "auto":
        return (path, *load_checkpoint(path))
    for candidate in reversed(complete_checkpoints(run_dir)):
        try:
            loaded = (candidate, *load_checkpoint(candidate))
        except CorruptCheckpoint as err:
            aside = candidate.with_name(f"{candidate.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            candidate.rename(aside)
            echo(
                f"checkpoint {candidate.name} is corrupt ({err}); moved it to {aside.name}, trying an older one"
            )
            continue
        if candidate != path:
            echo(f"resuming from {candidate.name}, the newest intact checkpoint")
        return loaded
    raise ConfigError(
        f"no intact checkpoint under {checkpoint_root(run_dir)} (the corrupt ones were moved aside); "
        "start over with resume: never, or under another name"
    )


def load_checkpoint(path: Path) -> tuple[TrainerState, dict[str, Any], dict[str, Any]]:
    """(trainer state, learner state, saved config as a dict); tensors loaded without pickle.

    Raises CorruptCheckpoint naming the file that cannot be read back (missing, truncated, empty).
    """
    import torch
    from safetensors.torch import load_file

    def read(name: str, loader: Any) -> Any:
        try:
            return loader(path / name)
        except Exception as err:  # truncated/garbled files raise whatever their parser raises
            first = (str(err).strip().splitlines() or [""])[0][:200]
            raise CorruptCheckpoint(f"{path / name}: {type(err).__name__}: {first}") from None

    state_dict = read("state.json", lambda p: json.loads(p.read_text()))
    try:
        state = TrainerState(**state_dict)
    except TypeError as err:
        raise CorruptCheckpoint(f"{path / 'state.json'}: not a trainer state ({err})") from None
    learner_state = read("learner_state.pt", lambda p: torch.load(p, weights_only=True))
    learner_state["adapter"] = read("adapter/adapter_model.safetensors", lambda p: load_file(str(p)))
    saved = read("config.yaml", lambda p: yaml.safe_load(p.read_text()))
    if not isinstance(saved, dict):
        raise CorruptCheckpoint(f"{path / 'config.yaml'}: not a config mapping")
    return state, learner_state, saved


def check_compatible(saved: dict[str, Any], cfg: RunConfig) -> None:
    """Refuse a resume whose config changes what cannot change, listing every differing key."""
    current = cfg.model_dump(mode="json")
    differing = []
    for key in FROZEN_KEYS:
        before, now = _lookup(saved, key), _lookup(current, key)
        if before != now:
            differing.append(f"{key}: checkpoint {before!r} -> now {now!r}")
    if differing:
        raise ConfigError(
            "cannot resume: these settings differ from the checkpoint's and would train a different model:\n  "
            + "\n  ".join(differing)
            + "\nrestore them, or start a new run (another name, or resume: never)"
        )


def restore_metrics(checkpoint: Path, run_dir: Path) -> None:
    """Metrics logged after the checkpoint belong to the lost steps; the checkpoint's copy replaces them."""
    saved = checkpoint / "metrics.jsonl"
    if saved.exists():
        shutil.copyfile(saved, run_dir / "metrics.jsonl")


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node
