"""Prompts from dataset files: rows read, gold extracted, chat template applied once, tokenized.

Everything here runs before any model or actor starts, so a bad row stops the run in seconds.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.config import ConfigError, DataConfig, resolve_project_path
from grpo_ray.seeds import epoch_order_seed

_READERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


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


def read_rows(files: list[str]) -> list[dict[str, Any]]:
    """All rows of local JSONL/Parquet/CSV files, through `datasets` (one code path for every format)."""
    import datasets

    paths = [resolve_project_path(f) for f in files]
    for path in paths:
        if not path.exists():
            raise ConfigError(f"data file '{path}' not found; check data.train_files / data.eval_files")
    suffixes = {p.suffix for p in paths}
    if len(suffixes) != 1 or next(iter(suffixes)) not in _READERS:
        raise ConfigError(f"data files must share one format of {sorted(_READERS)}; got {sorted(suffixes)}")
    datasets.disable_progress_bars()
    dataset = datasets.load_dataset(
        _READERS[next(iter(suffixes))], data_files=[str(p) for p in paths], split="train"
    )
    return [dict(row) for row in dataset]


def extract_gold(raw: Any, gold_format: str) -> str:
    text = str(raw).strip()
    if gold_format == "gsm8k":
        _, sep, after = text.rpartition("####")
        if not sep:
            raise ValueError("no '####' marker")
        text = after.strip()
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
    """The train or eval prompts from local files or the hub; None when no eval source is configured."""
    if cfg.hub_dataset:
        split = cfg.train_split if which == "train" else cfg.eval_split
        if split is None:
            return None
        rows, source = read_hub_rows(cfg.hub_dataset, cfg.hub_config, split), f"{cfg.hub_dataset}[{split}]"
    else:
        files = cfg.train_files if which == "train" else cfg.eval_files
        if not files:
            return None
        rows, source = read_rows(files), ", ".join(Path(f).name for f in files)
    return build_prompts(rows, cfg, tokenizer, seed, source)


def build_prompts(
    rows: list[dict[str, Any]], cfg: DataConfig, tokenizer: Any, seed: int, source: str = "rows"
) -> PromptSet:
    """Rows -> token-id prompts, shuffled with the run's seed; too-long prompts dropped and counted."""
    prompts: list[Prompt] = []
    dropped = skipped = 0
    for index, row in enumerate(rows):
        try:
            # `datasets` fills a field some rows lack with None, so None counts as missing.
            question, answer = (_field(row, name) for name in (cfg.question_field, cfg.answer_field))
            gold = extract_gold(answer, cfg.gold_format)
            if str(question).strip() == "":
                raise ValueError(f"empty '{cfg.question_field}'")
        except (KeyError, ValueError) as err:
            if cfg.on_bad_row == "skip":
                skipped += 1
                continue
            missing = f"missing field {err}" if isinstance(err, KeyError) else str(err)
            raise ConfigError(
                f"{source} row {index}: {missing} (fields present: {sorted(row)}); fix the row, point "
                f"data.question_field / data.answer_field at the right fields, or set data.on_bad_row: skip"
            ) from None
        token_ids = encode_prompt(tokenizer, cfg, str(question))
        if len(token_ids) > cfg.max_prompt_tokens:
            dropped += 1
            continue
        prompts.append(Prompt(index=index, token_ids=token_ids, row={**row, "gold": gold}))
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


def encode_prompt(tokenizer: Any, cfg: DataConfig, question: str) -> list[int]:
    """Chat template applied once; exactly one BOS when the tokenizer has one."""
    messages = [{"role": "user", "content": cfg.user_template.format(question=question)}]
    if cfg.system_prompt:
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
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


class PromptStream:
    """Endless shuffled passes over the prompts; `cursor` is all the state a resume needs."""

    def __init__(self, prompts: list[Prompt], seed: int, cursor: int = 0) -> None:
        self.prompts = prompts
        self.seed = seed
        self.cursor = cursor

    def take(self, count: int) -> list[Prompt]:
        out = []
        for _ in range(count):
            epoch, offset = divmod(self.cursor, len(self.prompts))
            order = list(range(len(self.prompts)))
            random.Random(epoch_order_seed(self.seed, epoch)).shuffle(order)
            out.append(self.prompts[order[offset]])
            self.cursor += 1
        return out
