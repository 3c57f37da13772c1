"""Prompts from dataset files: rows read, gold extracted, chat template applied once, tokenized.

Everything here runs before any model or actor starts, so a bad row stops the run in seconds.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.config import ConfigError, DataConfig
from cluster.data.encoding import Messages, TokenizerEncoder, encode_messages
from cluster.data.files import FileRows, read_files
from grpo_ray.seeds import epoch_order_seed

_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Prompt:
    """One dataset row ready for rollout: its token ids and the fields rewards need (incl. `gold`)."""

    index: int
    token_ids: list[int]
    row: dict[str, Any]


@dataclass
class PromptSet:
    prompts: list[Prompt]
    dropped_too_long: int
    skipped_bad_rows: int
    source: str


def read_rows(files: list[str], on_bad_row: str = "error") -> FileRows:
    """All rows of local JSONL/JSON/CSV/Parquet files, each tagged with its file and line."""
    return read_files(files, on_bad_row)


def extract_gold(raw: Any, gold_format: str) -> str:
    """The gold answer string of a row's answer field; ValueError for a value that holds no answer."""
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise ValueError(
            f"the answer is a {type(raw).__name__} ({_short(raw)}), not a string or a number; point "
            "data.answer_field at the field holding the answer text"
        )
    if isinstance(raw, float) and not math.isfinite(raw):
        raise ValueError(f"the answer is {raw}, not a number")
    text = str(raw).strip()
    if not text:
        raise ValueError("the answer is empty")
    if gold_format == "gsm8k":
        _, sep, after = text.rpartition("####")
        if not sep:
            raise ValueError("no '####' marker")
        text = after.strip()
        if not text:
            raise ValueError("nothing after the '####' marker")
    return re.sub(r"(?<=\d),(?=\d{3})", "", text)


def read_hub_rows(dataset: str, config: str | None, split: str) -> list[dict[str, Any]]:
    """Rows of a hub dataset split (downloaded once into the HF cache, or read from it offline)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        loaded = datasets.load_dataset(dataset, config, split=split)
    except Exception as err:  # offline, unknown id, missing split or config: all need the user's fix
        raise ConfigError(
            f"could not load hub dataset '{dataset}' (config {config!r}, split '{split}'): {err}. Check the id, "
            "data.hub_config and the split name; offline, download it once or use data.train_files"
        ) from None
    return [dict(row) for row in loaded]


def load_split(cfg: DataConfig, which: str, seed: int, tokenizer: Any) -> PromptSet | None:
    """The train or eval prompts from local files or the hub; None when no eval source is configured.

    `tokenizer`: the model's tokenizer, or an encoder with `encode_all` (`cluster.data.encoding`:
    a CachedEncoder reuses an earlier run's ids). Raises ConfigError naming a bad row or file.
    """
    if cfg.hub_dataset:
        split = cfg.train_split if which == "train" else cfg.eval_split
        if split is None:
            return None
        rows, source = read_hub_rows(cfg.hub_dataset, cfg.hub_config, split), f"{cfg.hub_dataset}[{split}]"
    else:
        files = cfg.train_files if which == "train" else cfg.eval_files
        if not files:
            return None
        read = read_rows(files, cfg.on_bad_row)
        source = ", ".join(Path(f).name for f in files)
        return build_prompts(
            read.rows, cfg, tokenizer, seed, source, where=read.where, skipped_lines=read.skipped_lines
        )
    return build_prompts(rows, cfg, tokenizer, seed, source)


def build_prompts(
    rows: list[dict[str, Any]],
    cfg: DataConfig,
    tokenizer: Any,
    seed: int,
    source: str = "rows",
    where: list[str] | None = None,
    skipped_lines: int = 0,
) -> PromptSet:
    """Rows -> token-id prompts, shuffled with the run's seed; too-long prompts dropped and counted.

    A bad row (missing field, empty or non-text question, answer that is not a string or number)
    raises ConfigError naming it (`where[i]`, else `source row i`), or is skipped and counted
    (`skipped_lines`: lines the file reader already skipped, counted with them). `tokenizer` as in
    `load_split`.
    """
    valid: list[tuple[int, Messages, dict[str, Any]]] = []
    skipped = skipped_lines
    for index, row in enumerate(rows):
        try:
            # `datasets` fills a field some rows lack with None, so None counts as missing.
            question, answer = (_field(row, name) for name in (cfg.question_field, cfg.answer_field))
            gold = extract_gold(answer, cfg.gold_format)
            messages = render_messages(cfg, question)
        except (KeyError, ValueError) as err:
            if cfg.on_bad_row == "skip":
                skipped += 1
                continue
            missing = f"missing field {err}" if isinstance(err, KeyError) else str(err)
            named = where[index] if where is not None else f"{source} row {index}"
            raise ConfigError(
                f"{named}: {missing} (fields present: {sorted(row)}); fix the row, point "
                f"data.question_field / data.answer_field at the right fields, or set data.on_bad_row: skip"
            ) from None
        valid.append((index, messages, {**row, "gold": gold}))
    # Every row is checked before the first is encoded: a bad row fails before any tokenizer loads.
    encoded = _encoder(tokenizer).encode_all([messages for _, messages, _ in valid])
    prompts = [
        Prompt(index=index, token_ids=ids, row=row)
        for (index, _, row), ids in zip(valid, encoded, strict=True)
        if len(ids) <= cfg.max_prompt_tokens
    ]
    dropped = len(valid) - len(prompts)
    if not prompts:
        raise ConfigError(
            f"no usable prompts in {source}: {dropped} longer than data.max_prompt_tokens="
            f"{cfg.max_prompt_tokens}, {skipped} bad rows skipped"
        )
    random.Random(seed).shuffle(prompts)
    return PromptSet(prompts, dropped, skipped, source=source)


def _field(row: dict[str, Any], name: str) -> Any:
    if row.get(name) is None:
        raise KeyError(name)
    return row[name]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def render_messages(cfg: DataConfig, question: Any) -> list[dict[str, str]]:
    """The chat messages of one prompt. ValueError names what is wrong with the question value.

    A string question becomes one user message through `data.user_template`. A list of chat
    messages (`[{"role": ..., "content": ...}]`, the hub's conversational format) is kept as it is,
    except that its LAST user message goes through `user_template` like a string question would;
    `data.system_prompt` is prepended unless the row has its own system message. The list must end
    with a user message (the model answers it).
    """
    if isinstance(question, str):
        if not question.strip():
            raise ValueError(f"empty '{cfg.question_field}'")
        messages = [{"role": "user", "content": question}]
    elif isinstance(question, list):
        messages = _chat_messages(cfg.question_field, question)
    else:
        raise ValueError(
            f"'{cfg.question_field}' is a {type(question).__name__} ({_short(question)}), not a string or a "
            "list of chat messages"
        )
    last = messages[-1]
    messages[-1] = {"role": "user", "content": cfg.user_template.format(question=last["content"])}
    for message in messages:  # the row's own text (the config's strings are the user's to fix)
        _check_unicode(cfg.question_field, message["content"])
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    return messages


def _check_unicode(name: str, text: str) -> None:
    """ValueError for text no tokenizer can take: a lone UTF-16 surrogate (JSON allows `\\ud800`
    unpaired, Python decodes it, but it is not a Unicode scalar value, and tokenizers raise a TypeError
    that names nothing)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"'{name}' holds a lone surrogate {text[err.start]!r} at character {err.start} "
            f"(near {text[max(0, err.start - 20) : err.start + 20]!r}), which is not valid Unicode text; "
            "fix the escape sequence in the row"
        ) from None


def _chat_messages(name: str, items: list[Any]) -> list[dict[str, str]]:
    if not items:
        raise ValueError(f"'{name}' is an empty list of chat messages")
    messages = []
    for k, item in enumerate(items):
        if (
            not isinstance(item, dict)
            or item.get("role") not in _ROLES
            or not isinstance(item.get("content"), str)
        ):
            raise ValueError(
                f"'{name}' message {k} ({_short(item)}) is not a chat message "
                f"{{'role': one of {list(_ROLES)}, 'content': text}}"
            )
        messages.append({"role": item["role"], "content": item["content"]})
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise ValueError(
            f"'{name}' must end with a non-empty user message (the model answers it); it ends with "
            f"a {messages[-1]['role']} message"
        )
    return messages


def _encoder(tokenizer: Any) -> Any:
    """A CachedEncoder / TokenizerEncoder as given, a bare tokenizer wrapped in one."""
    return tokenizer if hasattr(tokenizer, "encode_all") else TokenizerEncoder(tokenizer)


def encode_prompt(tokenizer: Any, cfg: DataConfig, question: Any) -> list[int]:
    """A question (string or chat messages) rendered and tokenized; see `render_messages`."""
    return encode_messages(tokenizer, render_messages(cfg, question))


class PromptStream:
    """Endless shuffled passes over the prompts; `cursor` is all the state a resume needs."""

    def __init__(self, prompts: list[Prompt], seed: int, cursor: int = 0) -> None:
        self.prompts = prompts
        self.seed = seed
        self.cursor = cursor
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, its permutation): one shuffle per pass

    def take(self, count: int) -> list[Prompt]:
        out = []
        for _ in range(count):
            epoch, offset = divmod(self.cursor, len(self.prompts))
            out.append(self.prompts[self._epoch_order(epoch)[offset]])
            self.cursor += 1
        return out

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order[0] != epoch:  # shuffling 7800 rows costs ~3 ms: once per pass, not per prompt
            order = list(range(len(self.prompts)))
            random.Random(epoch_order_seed(self.seed, epoch)).shuffle(order)
            self._order = (epoch, order)
        return self._order[1]
