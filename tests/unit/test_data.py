"""Prompt loading: bad rows named or skipped, over-long prompts dropped and counted, one BOS."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cluster.config import ConfigError, DataConfig
from cluster.data.prompts import PromptStream, encode_prompt, extract_gold, load_split


class CharTokenizer:
    """A stand-in with the two calls build_prompts makes; the real tokenizer is tested in integration."""

    chat_template = "user: {q}\nassistant:"

    def __init__(self, bos: int | None = None) -> None:
        self.bos_token_id = bos

    def apply_chat_template(self, messages: list[dict[str, str]], **_: Any) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        ids = [ord(c) % 250 + 3 for c in text]
        return {"input_ids": ([self.bos_token_id] if self.bos_token_id is not None else []) + ids}


def _write(tmp_path: Path, rows: list[dict[str, Any]]) -> str:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_row_is_named(tmp_path: Path) -> None:
    files = [_write(tmp_path, [{"question": "1+1?", "answer": "2"}, {"question": "2+2?"}])]
    with pytest.raises(ConfigError, match=r"rows\.jsonl line 2: missing field 'answer'.*on_bad_row: skip"):
        load_split(DataConfig(train_files=files), "train", 0, CharTokenizer())


def test_bad_row_skipped_and_counted(tmp_path: Path) -> None:
    files = [_write(tmp_path, [{"question": "1+1?", "answer": "2"}, {"question": "2+2?"}])]
    prompts = load_split(DataConfig(train_files=files, on_bad_row="skip"), "train", 0, CharTokenizer())
    assert (len(prompts.prompts), prompts.skipped_bad_rows) == (1, 1)
    assert prompts.prompts[0].row["gold"] == "2"


def test_long_prompts_dropped_and_counted(tmp_path: Path) -> None:
    rows = [{"question": "x" * n, "answer": "1"} for n in (1, 5, 50)]
    files = [_write(tmp_path, rows)]
    # "<user>" + question + "<assistant>" = 6 + n + 11 characters, one token each
    cfg = DataConfig(train_files=files, max_prompt_tokens=6 + 5 + 11)
    prompts = load_split(cfg, "train", 0, CharTokenizer())
    assert (len(prompts.prompts), prompts.dropped_too_long) == (2, 1)


def test_all_prompts_too_long_is_an_error(tmp_path: Path) -> None:
    files = [_write(tmp_path, [{"question": "x" * 50, "answer": "1"}])]
    with pytest.raises(ConfigError, match=r"no usable prompts.*1 longer than data\.max_prompt_tokens=4"):
        load_split(DataConfig(train_files=files, max_prompt_tokens=4), "train", 0, CharTokenizer())


class DoubleBosTokenizer(CharTokenizer):
    """Its chat template writes a BOS and tokenizing adds another: the classic double-BOS trap."""

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
        return "\x01" + super().apply_chat_template(messages, **kwargs)

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        ids = super().__call__(text.removeprefix("\x01"))["input_ids"]
        return {"input_ids": [1, *ids] if text.startswith("\x01") else ids}


def test_exactly_one_bos() -> None:
    cfg = DataConfig(train_files=["x.jsonl"])
    assert 1 not in encode_prompt(CharTokenizer(bos=None), cfg, "q")  # no BOS token: none added
    for tokenizer in (CharTokenizer(bos=1), DoubleBosTokenizer(bos=1)):
        ids = encode_prompt(tokenizer, cfg, "q")
        assert ids[0] == 1 and ids.count(1) == 1, ids


def test_gold_formats() -> None:
    assert extract_gold("so 3 + 4 = 7\n#### 1,234", "gsm8k") == "1234"
    assert extract_gold(" 85 ", "plain") == "85"
    with pytest.raises(ValueError, match="####"):
        extract_gold("no marker", "gsm8k")


def test_missing_file_is_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match=r"nope\.jsonl' not found"):
        load_split(DataConfig(train_files=[missing]), "train", 0, CharTokenizer())


def test_stream_is_a_shuffled_cycle_resumable_from_its_cursor() -> None:
    items = [SimpleNamespace(index=i) for i in range(5)]
    stream = PromptStream(items, seed=3)  # type: ignore[arg-type]
    first = [p.index for p in stream.take(7)]
    assert sorted(first[:5]) == list(range(5))
    resumed = PromptStream(items, seed=3, cursor=4)  # type: ignore[arg-type]
    assert [p.index for p in resumed.take(3)] == first[4:7]
