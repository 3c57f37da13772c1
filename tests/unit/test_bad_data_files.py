"""Data files that broke a run (issue 16): each bad file or line is named with its line and how to fix
it (or skipped and counted with on_bad_row: skip); conversational rows go through the chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cluster.config import ConfigError, DataConfig
from cluster.data.prompts import load_split

TINY = Path(__file__).resolve().parents[2] / "assets" / "tiny-qwen2"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY))  # the shipped model's real chat template


def _cfg(path: Path, **kwargs: Any) -> DataConfig:
    return DataConfig(train_files=[str(path)], **kwargs)


def _write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


GOOD = '{"question": "1+1?", "answer": "2"}\n'


@pytest.mark.parametrize("on_bad_row", ["error", "skip"])
def test_empty_jsonl_is_named(tmp_path: Path, tokenizer: Any, on_bad_row: str) -> None:
    path = _write(tmp_path, "train.jsonl", "")  # was a 42-line StopIteration traceback
    with pytest.raises(ConfigError, match=r"train\.jsonl' holds no rows"):
        load_split(_cfg(path, on_bad_row=on_bad_row), "train", 0, tokenizer)


def test_blank_lines_only_is_empty(tmp_path: Path, tokenizer: Any) -> None:
    with pytest.raises(ConfigError, match="holds no rows"):
        load_split(_cfg(_write(tmp_path, "train.jsonl", "\n \n")), "train", 0, tokenizer)


def test_broken_json_line_is_named(tmp_path: Path, tokenizer: Any) -> None:
    path = _write(tmp_path, "train.jsonl", GOOD + '{"question": "2+2?", "answer": "4"\n' + GOOD)
    with pytest.raises(ConfigError, match=r"^train\.jsonl line 2: invalid JSON \(.*\); .*on_bad_row: skip"):
        load_split(_cfg(path), "train", 0, tokenizer)
    prompts = load_split(_cfg(path, on_bad_row="skip"), "train", 0, tokenizer)
    assert prompts is not None
    assert (len(prompts.prompts), prompts.skipped_bad_rows) == (2, 1)


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("[1, 2]", r"line 2: a JSON list, not an object"),
        ("5", r"line 2: a JSON int, not an object"),
        ('{"question": "x", "answer": {"value": 5}}', r"line 2: the answer is a dict \(\{'value': 5\}\)"),
        ('{"question": "x", "answer": ""}', r"line 2: the answer is empty"),
        ('{"question": "x", "answer": "  "}', r"line 2: the answer is empty"),
        ('{"question": "x", "answer": [5]}', r"line 2: the answer is a list"),
        ('{"question": "x", "answer": true}', r"line 2: the answer is a bool"),
        ('{"question": "x", "answer": NaN}', r"line 2: the answer is nan"),
        ('{"question": 5, "answer": "5"}', r"line 2: 'question' is a int \(5\), not a string or a list"),
        ('{"question": {"text": "x"}, "answer": "5"}', r"line 2: 'question' is a dict"),
        ('{"question": "", "answer": "5"}', r"line 2: empty 'question'"),
        ('{"question": [], "answer": "5"}', r"line 2: 'question' is an empty list of chat messages"),
        (
            '{"question": ["hi"], "answer": "5"}',
            r"line 2: 'question' message 0 \('hi'\) is not a chat message",
        ),
        (
            '{"question": [{"role": "bot", "content": "x"}], "answer": "5"}',
            r"line 2: 'question' message 0 .* is not a chat",
        ),
        (
            '{"question": [{"role": "user", "content": 5}], "answer": "5"}',
            r"line 2: 'question' message 0 .* is not a chat",
        ),
        (
            '{"question": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], '
            '"answer": "5"}',
            r"line 2: 'question' must end with a non-empty user message.*ends with a assistant message",
        ),
    ],
)
def test_bad_rows_are_named_and_skippable(tmp_path: Path, tokenizer: Any, line: str, fragment: str) -> None:
    path = _write(tmp_path, "train.jsonl", GOOD + line + "\n")
    with pytest.raises(ConfigError, match=r"^train\.jsonl " + fragment):
        load_split(_cfg(path), "train", 0, tokenizer)
    prompts = load_split(_cfg(path, on_bad_row="skip"), "train", 0, tokenizer)
    assert prompts is not None and (len(prompts.prompts), prompts.skipped_bad_rows) == (1, 1)


def test_numeric_answers_are_fine(tmp_path: Path, tokenizer: Any) -> None:
    path = _write(
        tmp_path, "train.jsonl", '{"question": "x", "answer": 5}\n{"question": "y", "answer": -2.5}\n'
    )
    prompts = load_split(_cfg(path), "train", 0, tokenizer)
    assert prompts is not None and sorted(p.row["gold"] for p in prompts.prompts) == ["-2.5", "5"]


def test_gsm8k_answer_without_a_number_after_the_marker(tmp_path: Path, tokenizer: Any) -> None:
    path = _write(tmp_path, "train.jsonl", '{"question": "x", "answer": "so ####  "}\n')
    with pytest.raises(ConfigError, match=r"line 1: nothing after the '####' marker"):
        load_split(_cfg(path, gold_format="gsm8k"), "train", 0, tokenizer)


def test_non_utf8_bytes_name_the_file_and_line(tmp_path: Path, tokenizer: Any) -> None:
    path = _write(tmp_path, "train.jsonl", GOOD.encode() + b'{"question": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(
        ConfigError, match=r"^train\.jsonl line 2: not UTF-8 text .*re-save the file as UTF-8"
    ):
        load_split(_cfg(path), "train", 0, tokenizer)
    prompts = load_split(_cfg(path, on_bad_row="skip"), "train", 0, tokenizer)
    assert prompts is not None and prompts.skipped_bad_rows == 1
    csv = _write(tmp_path, "train.csv", b"question,answer\n1+1?,2\ncaf\xe9,3\n")
    with pytest.raises(ConfigError, match=r"^train\.csv line 3: not UTF-8 text"):
        load_split(_cfg(csv), "train", 0, tokenizer)


def test_ragged_csv_rows_are_named_and_skippable(tmp_path: Path, tokenizer: Any) -> None:
    path = _write(tmp_path, "train.csv", 'question,answer\n1+1?,2\n2+2?,4,extra\n3+3?\n"4,+4?",8\n')
    with pytest.raises(
        ConfigError, match=r"^train\.csv line 3: 3 fields, but the header has 2 \(question, answer\)"
    ):
        load_split(_cfg(path), "train", 0, tokenizer)
    prompts = load_split(_cfg(path, on_bad_row="skip"), "train", 0, tokenizer)
    assert prompts is not None
    assert (len(prompts.prompts), prompts.skipped_bad_rows) == (2, 2)
    assert sorted(p.row["question"] for p in prompts.prompts) == ["1+1?", "4,+4?"]


def test_csv_empty_answer_is_a_bad_row(tmp_path: Path, tokenizer: Any) -> None:
    path = _write(tmp_path, "train.csv", "question,answer\n1+1?,2\n2+2?,\n")
    with pytest.raises(ConfigError, match=r"^train\.csv line 3: the answer is empty"):
        load_split(_cfg(path), "train", 0, tokenizer)


def test_csv_header_problems(tmp_path: Path, tokenizer: Any) -> None:
    with pytest.raises(ConfigError, match="holds no rows"):
        load_split(_cfg(_write(tmp_path, "a.csv", "")), "train", 0, tokenizer)
    with pytest.raises(ConfigError, match=r"line 1: the CSV header .* distinct"):
        load_split(_cfg(_write(tmp_path, "b.csv", "question,question\n1,2\n")), "train", 0, tokenizer)


def test_json_array_file_and_other_files(tmp_path: Path, tokenizer: Any) -> None:
    path = _write(tmp_path, "train.json", json.dumps([{"question": "1+1?", "answer": "2"}, 7]))
    with pytest.raises(ConfigError, match=r"^train\.json item 1: a JSON int"):
        load_split(_cfg(path), "train", 0, tokenizer)
    with pytest.raises(ConfigError, match="is a directory"):
        load_split(_cfg(tmp_path), "train", 0, tokenizer)
    with pytest.raises(ConfigError, match=r"unknown format '\.txt'"):
        load_split(_cfg(_write(tmp_path, "t.txt", "x")), "train", 0, tokenizer)
    with pytest.raises(ConfigError, match="not a readable Parquet file"):
        load_split(_cfg(_write(tmp_path, "t.parquet", "not parquet")), "train", 0, tokenizer)


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 10+20?"}]


def _rendered(tokenizer: Any, path: Path, **kwargs: Any) -> str:
    prompts = load_split(_cfg(path, question_field="prompt", **kwargs), "train", 0, tokenizer)
    assert prompts is not None
    return str(tokenizer.decode(prompts.prompts[0].token_ids))


def test_conversational_rows_render_as_chat_messages(tmp_path: Path, tokenizer: Any) -> None:
    path = _write(tmp_path, "chat.jsonl", json.dumps({"prompt": CHAT, "answer": "30"}) + "\n")
    # Was the Python repr of the list inside one user message.
    assert _rendered(tokenizer, path) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 10+20?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # user_template applies to the last user message; the row's own system message is kept.
    assert _rendered(tokenizer, path, user_template="Q: {question}", system_prompt="Other.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ: What is 10+20?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_conversational_row_without_system_gets_the_system_prompt(tmp_path: Path, tokenizer: Any) -> None:
    row = {"prompt": CHAT[1:], "answer": "30"}
    path = _write(tmp_path, "chat.jsonl", json.dumps(row) + "\n")
    chat = _rendered(tokenizer, path, system_prompt="Be brief.", user_template="Q: {question}")
    # ... exactly as the same question as a plain string renders with the same settings
    plain = _write(tmp_path, "plain.jsonl", json.dumps({"prompt": "What is 10+20?", "answer": "30"}) + "\n")
    assert chat == _rendered(tokenizer, plain, system_prompt="Be brief.", user_template="Q: {question}")
    assert chat.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ: What is 10+20?")


@pytest.mark.parametrize("chat", [False, True])
def test_a_lone_surrogate_is_named_not_a_tokenizer_type_error(
    tmp_path: Path, tokenizer: Any, chat: bool
) -> None:
    # JSON may escape half of a UTF-16 pair ("\ud800"); Python decodes it to a str no tokenizer takes
    # (it raised "TypeError: TextEncodeInput must be Union[...]" from inside transformers).
    question = '"\\ud800t is 1+1?"' if not chat else '[{"role": "user", "content": "\\ud800t is 1+1?"}]'
    path = _write(tmp_path, "train.jsonl", GOOD + f'{{"question": {question}, "answer": "2"}}\n')
    with pytest.raises(
        ConfigError, match=r"train\.jsonl line 2: 'question' holds a lone surrogate '\\ud800'"
    ):
        load_split(_cfg(path), "train", 0, tokenizer)
    prompts = load_split(_cfg(path, on_bad_row="skip"), "train", 0, tokenizer)
    assert (len(prompts.prompts), prompts.skipped_bad_rows) == (1, 1)
