"""The prompt-token cache: a second run with the same inputs reads the ids back without loading the
tokenizer; any change to what the ids depend on (messages, tokenizer files, libraries) encodes again;
a broken or unwritable cache never fails a run. The real tokenizer's cached ids are checked against
fresh ones in tests/integration/test_shipped_model_loads.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cluster.config import DataConfig
from cluster.data import encoding
from cluster.data.encoding import CachedEncoder
from cluster.data.prompts import load_split


class CountingTokenizer:
    """A stand-in with the calls encode_messages makes; `calls` counts templates applied."""

    chat_template = "unused by the stand-in"
    bos_token_id = None
    pad_token_id = None
    eos_token_id = 2

    def __init__(self) -> None:
        self.calls = 0

    def apply_chat_template(self, messages: list[dict[str, str]], **_: Any) -> str:
        self.calls += 1
        return "".join(f"<{m['role']}>{m['content']}" for m in messages)

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 250 + 3 for c in text]}


class Loader:
    def __init__(self) -> None:
        self.loaded: list[CountingTokenizer] = []

    def __call__(self) -> CountingTokenizer:
        self.loaded.append(CountingTokenizer())
        return self.loaded[-1]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_text('{"v": 1}')
    (model / "model.safetensors").write_bytes(b"weights")
    return model


def _data(tmp_path: Path, questions: list[str], **kwargs: Any) -> DataConfig:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": "1"}) + "\n" for q in questions))
    return DataConfig(train_files=[str(path)], **kwargs)


def _load(cfg: DataConfig, model: Path, cache: Path, loader: Loader) -> tuple[Any, CachedEncoder]:
    encoder = CachedEncoder(str(model), cache, loader)
    return load_split(cfg, "train", 0, encoder), encoder


def test_a_second_load_reads_the_ids_back_without_the_tokenizer(tmp_path: Path, model_dir: Path) -> None:
    cfg = _data(
        tmp_path, ["1+1?", "2+2?", "a much longer question than the limit allows"], max_prompt_tokens=20
    )
    first_loader, second_loader = Loader(), Loader()
    first, encoder = _load(cfg, model_dir, tmp_path / "cache", first_loader)
    assert (encoder.misses, encoder.hits, len(first_loader.loaded)) == (1, 0, 1)
    second, encoder = _load(cfg, model_dir, tmp_path / "cache", second_loader)
    assert (encoder.misses, encoder.hits, second_loader.loaded) == (0, 1, [])
    assert encoder.pad_id == 2  # the pad id comes back with the ids: still no tokenizer
    assert second_loader.loaded == []
    # ints written as JSON and read back: the same prompts, order, drops and rows
    assert second == first and first.dropped_too_long == 1


def test_what_the_ids_depend_on_is_in_the_key(tmp_path: Path, model_dir: Path, monkeypatch: Any) -> None:
    cache = tmp_path / "cache"
    cfg = _data(tmp_path, ["1+1?"])
    _load(cfg, model_dir, cache, Loader())

    def misses(cfg: DataConfig) -> int:
        return _load(cfg, model_dir, cache, Loader())[1].misses

    assert misses(cfg) == 0
    assert misses(_data(tmp_path, ["1+1?"], user_template="Q: {question}")) == 1  # messages changed
    assert misses(_data(tmp_path, ["1+1?"], system_prompt="be brief")) == 1
    (model_dir / "model.safetensors").write_bytes(b"other weights")  # weights: not the tokenizer
    assert misses(cfg) == 0
    (model_dir / "tokenizer.json").write_text('{"v": 2}')
    assert misses(cfg) == 1
    assert misses(cfg) == 0
    (model_dir / "additional_chat_templates").mkdir()  # transformers reads these too
    (model_dir / "additional_chat_templates" / "default.jinja").write_text("{{ messages }}")
    assert misses(cfg) == 1
    real_version = encoding.metadata.version
    monkeypatch.setattr(
        encoding.metadata,
        "version",
        lambda name: "0.0-other" if name == "transformers" else real_version(name),
    )
    assert misses(cfg) == 1


def test_a_torn_entry_is_encoded_again_and_rewritten(tmp_path: Path, model_dir: Path) -> None:
    cache = tmp_path / "cache"
    cfg = _data(tmp_path, ["1+1?", "3+4?"])
    first, _ = _load(cfg, model_dir, cache, Loader())
    (entry,) = cache.iterdir()
    deep = "[" * 100_000 + "]" * 100_000  # json.loads: RecursionError, not ValueError
    booleans = '{"pad_id": true, "ids": [[1, 2], [true]]}'  # JSON true is a Python int
    for broken in (
        '{"pad_id": 2, "ids": [[1, 2], [3',
        '{"pad_id": 2, "ids": [["x"], [1]]}',
        "[]",
        deep,
        booleans,
    ):
        entry.write_text(broken)
        again, encoder = _load(cfg, model_dir, cache, Loader())
        assert encoder.misses == 1 and again == first
        assert _load(cfg, model_dir, cache, Loader())[1].hits == 1  # rewritten whole


def test_an_unwritable_cache_warns_and_the_run_goes_on(tmp_path: Path, model_dir: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory would go")
    cfg = _data(tmp_path, ["1+1?"])
    with pytest.warns(UserWarning, match="GRPO_RAY_CACHE_DIR"):
        prompts, encoder = _load(cfg, model_dir, blocker / "cache", Loader())
    assert len(prompts.prompts) == 1 and encoder.misses == 1


def test_no_cache_for_a_hub_id_not_downloaded_or_when_turned_off(tmp_path: Path) -> None:
    cfg = _data(tmp_path, ["1+1?"])
    for model, cache in (("someone/not-downloaded", tmp_path / "cache"), (str(tmp_path), None)):
        loader = Loader()
        encoder = CachedEncoder(model, cache, loader)
        load_split(cfg, "train", 0, encoder)
        load_split(cfg, "train", 0, encoder)
        assert encoder.cache_dir is None and encoder.hits == 0 and len(loader.loaded) == 1
    assert not (tmp_path / "cache").exists()


def test_the_default_directory_follows_the_environment(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("GRPO_RAY_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert encoding.default_cache_dir() == tmp_path / "xdg" / "grpo-ray" / "prompt-tokens"
    monkeypatch.setenv("GRPO_RAY_CACHE_DIR", str(tmp_path / "mine"))
    assert encoding.default_cache_dir() == tmp_path / "mine" / "prompt-tokens"


def test_a_template_that_reads_the_clock_is_never_cached(tmp_path: Path, model_dir: Path) -> None:
    # Llama 3's templates print today's date: yesterday's ids would be wrong today
    (model_dir / "chat_template.jinja").write_text("{{ strftime_now('%d %b %Y') }}{{ messages }}")
    encoder = CachedEncoder(str(model_dir), tmp_path / "cache", Loader())
    assert encoder.cache_dir is None


def test_no_home_directory_means_no_cache_not_an_error(monkeypatch: Any) -> None:
    for name in ("GRPO_RAY_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(encoding.Path, "home", staticmethod(no_home))
    assert encoding.default_cache_dir() is None


def test_entries_no_run_reads_for_30_days_go_when_a_new_one_is_written(
    tmp_path: Path, model_dir: Path
) -> None:
    import os
    import time

    cache = tmp_path / "cache"
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    kept_cfg, new_cfg = _data(tmp_path / "a", ["1+1?"]), _data(tmp_path / "b", ["2+2?"])
    _load(kept_cfg, model_dir, cache, Loader())
    (kept,) = cache.iterdir()
    stale = cache / ("0" * 64 + ".json")  # an entry of an edited data set: no key asks for it again
    stale.write_text('{"pad_id": 2, "ids": [[5]]}')
    month_ago = time.time() - (encoding.UNUSED_DAYS + 1) * 86400
    for path in (kept, stale):
        os.utime(path, (month_ago, month_ago))
    _, encoder = _load(kept_cfg, model_dir, cache, Loader())  # a hit: the entry is in use again
    assert encoder.hits == 1 and kept.stat().st_mtime > month_ago
    _, encoder = _load(new_cfg, model_dir, cache, Loader())  # a miss writes, and prunes
    assert encoder.misses == 1
    assert kept.exists() and not stale.exists() and len(list(cache.iterdir())) == 2
