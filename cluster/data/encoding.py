"""Chat messages -> prompt token ids, with the ids of an earlier run reused when nothing changed.

Encoding a prompt set needs the model's tokenizer: `import transformers` plus the chat template
run once per row, several CPU seconds on the driver while Ray and the actors start on the same
cores. The ids depend only on the rendered messages, the tokenizer's files, the versions of the
libraries that apply the template (transformers, tokenizers, jinja2) and this file's code, so all
of these make up the cache key, and a run whose key matches reads the ids back (JSON of ints, no
pickle) without loading the tokenizer. A template that reads the clock (`strftime_now`) is never
cached. A cache that cannot be read or written is never an error:
the run encodes as it would without one. Entries no run has read for `UNUSED_DAYS` are removed when
a new entry is written (a hit refreshes its entry's modification time), so the directory stays the
size of what is in use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from cluster.config import ConfigError
from grpo_ray.cache_dir import cache_root

Messages = list[dict[str, str]]

# An entry no run has read for this long is removed when the next entry is written: edited data
# sets, other models and library upgrades each leave entries that no key will ask for again.
UNUSED_DAYS = 30

# Files in a model directory that cannot change what the tokenizer does (the weights): skipped
# when the directory is hashed, so a 15 GB checkpoint is not read to find its tokenizer unchanged.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")
_TEMPLATE_LIBRARIES = ("transformers", "tokenizers", "jinja2")


def encode_messages(tokenizer: Any, messages: Messages) -> list[int]:
    """Chat template applied once; exactly one BOS when the tokenizer has one.

    Raises ConfigError when the tokenizer has no chat template.
    """
    if tokenizer.chat_template is None:
        raise ConfigError(
            "the model's tokenizer has no chat template; use an instruct model or add a chat_template "
            "to its tokenizer_config.json"
        )
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None:
        while len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]
        if not ids or ids[0] != bos:
            ids = [bos, *ids]
    return ids


def pad_id_of(tokenizer: Any) -> int:
    """The id the learner pads batches with: the tokenizer's pad token, else its EOS."""
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


class TokenizerEncoder:
    """Encodes with a tokenizer already loaded (tests, benchmarks, `grpo-ray eval` after a miss)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode_all(self, messages: list[Messages]) -> list[list[int]]:
        """One id list per prompt, in order."""
        return [encode_messages(self.tokenizer, m) for m in messages]

    @property
    def pad_id(self) -> int:
        return pad_id_of(self.tokenizer)


class CachedEncoder:
    """Encodes through `cache_dir`: a key's ids are computed once, then read back in later runs.

    `load_tokenizer()` runs only on the first miss (a run whose every split hits never imports
    transformers). `cache_dir=None`, or a model whose tokenizer files cannot be found locally (a hub
    id not downloaded yet), encodes without the cache. `hits` and `misses` count encode_all calls.
    """

    def __init__(self, model: str, cache_dir: Path | None, load_tokenizer: Callable[[], Any]) -> None:
        self._load_tokenizer = load_tokenizer
        self._tokenizer: Any = None
        self._pad_id: int | None = None
        self.hits = self.misses = 0
        digest = tokenizer_digest(model) if cache_dir is not None else None
        self._dir = cache_dir if digest is not None else None
        # What every entry's key shares: computed once, not per split.
        self._key_prefix = json.dumps([_code_and_libraries(), digest], sort_keys=True).encode()

    @property
    def cache_dir(self) -> Path | None:
        """Where the ids are kept; None when this encoder does not use the cache."""
        return self._dir

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
        return self._tokenizer

    @property
    def pad_id(self) -> int:
        if self._pad_id is None:
            self._pad_id = pad_id_of(self.tokenizer)
        return self._pad_id

    def encode_all(self, messages: list[Messages]) -> list[list[int]]:
        """One id list per prompt, in order; ConfigError when the tokenizer has no chat template."""
        path = self._entry(messages)
        cached = _read_entry(path) if path is not None else None
        if path is not None and cached is not None and len(cached["ids"]) == len(messages):
            self.hits += 1
            with contextlib.suppress(OSError):  # in use: kept by the pruning below
                os.utime(path)
            self._pad_id = cached["pad_id"]
            return cached["ids"]
        self.misses += 1
        ids = TokenizerEncoder(self.tokenizer).encode_all(messages)
        if path is not None:
            _write_entry(path, {"pad_id": self.pad_id, "ids": ids})
            _remove_unused(path.parent)
        return ids

    def _entry(self, messages: list[Messages]) -> Path | None:
        if self._dir is None:
            return None
        key = hashlib.sha256(self._key_prefix)
        key.update(json.dumps(messages).encode())  # ASCII escapes: a lone surrogate hashes too
        return self._dir / f"{key.hexdigest()}.json"


def default_cache_dir() -> Path | None:
    """grpo_ray.cache_dir.cache_root() + /prompt-tokens ($GRPO_RAY_CACHE_DIR, else
    $XDG_CACHE_HOME/grpo-ray, else ~/.cache/grpo-ray). None without a home directory."""
    root = cache_root()
    return None if root is None else root / "prompt-tokens"


def tokenizer_digest(model: str) -> str | None:
    """sha256 over the relative paths and bytes of the model directory's non-weight files, subfolders
    included (config, tokenizer files, chat templates, `additional_chat_templates/`). None, so the
    run encodes without the cache, when the model is a hub id whose files are not in the local HF
    cache, or when a chat template reads the clock (`strftime_now`, as Llama 3's print today's
    date): then the ids depend on when the run starts.
    """
    directory = Path(model)
    if not directory.is_dir():
        directory_or_none = _hub_snapshot(model)
        if directory_or_none is None:
            return None
        directory = directory_or_none
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES):
            content = path.read_bytes()
            if b"strftime_now" in content:
                return None
            digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(content).digest())
    return digest.hexdigest()


def _hub_snapshot(model: str) -> Path | None:
    """The local snapshot directory of a hub model id, if its tokenizer config is cached there."""
    if model.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(model, "tokenizer_config.json")
    return Path(found).parent if isinstance(found, str) else None


def _code_and_libraries() -> dict[str, str]:
    versions = {}
    for name in _TEMPLATE_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    versions["encoding.py"] = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    return versions


def _read_entry(path: Path) -> dict[str, Any] | None:
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # absent, unreadable, torn: encode again, rewrite
        return None
    if not isinstance(entry, dict):
        return None
    ids, pad_id = entry.get("ids"), entry.get("pad_id")
    if not isinstance(ids, list) or type(pad_id) is not int:  # a JSON true is a Python int too
        return None
    if not all(isinstance(one, list) and all(type(t) is int for t in one) for one in ids):
        return None
    return {"ids": ids, "pad_id": pad_id}


def _write_entry(path: Path, entry: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(entry, separators=(",", ":")))
        os.replace(tmp, path)  # atomic: a concurrent run reads the old entry or the new, never half
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        warnings.warn(
            f"could not keep the tokenized prompts in {path.parent} ({err}); runs still work but "
            "re-tokenize each time. Set GRPO_RAY_CACHE_DIR to a writable directory or data.token_cache: false",
            stacklevel=2,
        )


def _remove_unused(directory: Path, days: float = UNUSED_DAYS) -> None:
    """Delete entries (and torn temporary files) not read or written for `days`; best effort."""
    import time

    cutoff = time.time() - days * 86400
    with contextlib.suppress(OSError):
        for entry in directory.iterdir():
            if entry.suffix in (".json", ".tmp"):
                with contextlib.suppress(OSError):
                    if entry.stat().st_mtime < cutoff:
                        entry.unlink()
