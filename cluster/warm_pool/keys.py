"""What makes a spare the same actor a run would start: its key.

A key is a few named digests (sha256, hex) so a mismatch can say which part differs: the actor (its
class, constructor arguments and Ray options: the run's config as that actor sees it), the code (the
project's Python sources, the versions of the packages the actors import, the interpreter), and the
model (the model directory's files: names, sizes, modification times).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import sys
from pathlib import Path
from typing import Any

from cluster.placement import ActorSpec

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cluster", "grpo_ray", "learner", "rollout", "rewards")  # what the actors import from us
DISTRIBUTIONS = ("torch", "vllm", "transformers", "peft", "bitsandbytes", "ray", "tokenizers", "safetensors")

SpareKey = dict[str, str]  # role, actor, code, model (digests); settings (JSON, for messages only)
MAX_NAMED = 3  # differing settings a mismatch message names


def spare_key(role: str, spec: ActorSpec, code: str, model: str) -> SpareKey:
    """The key of the actor `spec` describes, for `role` ('rollout-0', ..., 'learner'), with the
    `code_digest()` and `model_digest()` of what it imports and loads. `settings` holds the
    constructor's arguments by name and the Ray options, flattened: a mismatch names what differs.
    """
    actor = {
        "class": f"{spec.cls.__module__}.{spec.cls.__qualname__}",
        "args": _plain(spec.args),
        "options": _plain(spec.options),
    }
    names = spec.arg_names or tuple(inspect.signature(spec.cls).parameters)[: len(spec.args)]
    settings = _flatten({**dict(zip(names, actor["args"], strict=True)), "ray": actor["options"]})
    return {
        "role": role,
        "actor": _digest(actor),
        "code": code,
        "model": model,
        "settings": json.dumps(settings, sort_keys=True, default=repr),
    }


def mismatch(held: list[SpareKey], wanted: list[SpareKey]) -> str | None:
    """Why the spares `held` cannot serve a run that needs `wanted` (None: they can), in words."""
    held_roles, wanted_roles = [k["role"] for k in held], [k["role"] for k in wanted]
    if held_roles != wanted_roles:
        return f"it holds {', '.join(held_roles)}; this run starts {', '.join(wanted_roles)}"
    for part, words in (
        ("code", "the project's code or its packages changed since it was warmed up"),
        ("model", "the model's files changed since it was warmed up"),
    ):
        differ = [w["role"] for h, w in zip(held, wanted, strict=True) if h[part] != w[part]]
        if differ:
            return f"{words} ({', '.join(differ)})"
    if all(h["actor"] == w["actor"] for h, w in zip(held, wanted, strict=True)):
        return None
    changes: dict[str, list[str]] = {}  # "setting: pool's value, this run's" -> roles
    for h, w in zip(held, wanted, strict=True):
        if h["actor"] != w["actor"]:
            for change in _changed(json.loads(h["settings"]), json.loads(w["settings"])):
                changes.setdefault(change, []).append(h["role"])
    named = [f"{', '.join(roles)}: {change}" for change, roles in list(changes.items())[:MAX_NAMED]]
    more = f"; and {len(changes) - MAX_NAMED} more" if len(changes) > MAX_NAMED else ""
    return (
        "this run's settings differ from the config it was warmed up with ("
        + ("; ".join(named) or "its actors' arguments")
        + more
        + "): warm up with this run's config to use the pool"
    )


def _changed(held: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    return [
        f"{name} {held.get(name, '(none)')!r} in the pool, {wanted.get(name, '(none)')!r} here"
        for name in sorted(set(held) | set(wanted))
        if held.get(name) != wanted.get(name)
    ]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}


def code_digest() -> str:
    """The project's sources under PACKAGES, the installed versions of DISTRIBUTIONS, the interpreter,
    as they are on disk now (about 5 ms for the ~100 files): what a process started now imports."""
    digest = hashlib.sha256(f"{sys.executable} {sys.version}".encode())
    for package in PACKAGES:
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(PROJECT_ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    for name in DISTRIBUTIONS:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "-"
        digest.update(f"{name}=={version}\0".encode())
    return digest.hexdigest()


def model_digest(model: str) -> str:
    """A local model directory: every file's relative name, size and mtime; a hub id: the id."""
    path = Path(model)
    if not path.is_dir():
        return _digest(model)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return _digest(
        [model, *[(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]]
    )


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()


def _plain(value: Any) -> Any:
    """JSON-able form of constructor arguments and options (configs as their resolved fields)."""
    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def local_model(model: str) -> str:
    """A model directory as an absolute path (spares are built in the pool's directory, not the
    run's), a hub id unchanged."""
    path = Path(model)
    return str(path.resolve()) if path.is_dir() else model


def run_spares(cfg: Any, model: str, pad_id: int) -> list[tuple[SpareKey, ActorSpec]]:
    """(key, spec) of every actor a run of `cfg` starts, in the order a claim hands them out: the
    rollout workers by slot, then the learner. `cfg` is a cluster.config.RunConfig; `model` comes
    from `local_model`. Raises ValueError for a data-parallel learner (its ranks join a DeepSpeed
    group at start, so a spare cannot be made for them)."""
    from cluster.placement import learner_spec, learner_world_size, worker_spec

    if learner_world_size(cfg) != 1:
        raise ValueError(
            f"the warm pool holds one learner; learner.num_gpus = {cfg.learner.num_gpus} starts "
            f"{learner_world_size(cfg)} data-parallel ranks: run this config without a pool, or warm "
            "up with learner.num_gpus=1"
        )
    specs = [(f"rollout-{slot}", worker_spec(cfg, model, slot)) for slot in range(cfg.rollout.num_workers)]
    specs.append(("learner", learner_spec(cfg, model, pad_id)))
    code, files = code_digest(), model_digest(model)
    return [(spare_key(role, spec, code, files), spec) for role, spec in specs]
