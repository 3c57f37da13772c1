"""Rows of local data files, each tagged with where it came from (`train.jsonl line 2`).

JSONL and CSV are read line by line with the standard library, so a broken line is reported with its
file and line number (and skipped and counted with `data.on_bad_row: skip`) instead of surfacing as a
`datasets` generation error; Parquet (binary, columnar) goes through `datasets`/pyarrow.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.config import ConfigError, resolve_project_path

FORMATS = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class FileRows:
    """Rows in file order, `where[i]` naming rows[i]'s file and line; lines skipped as unreadable."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    skipped_lines: int = 0


class _BadLine(ValueError):
    pass


def read_files(files: list[str], on_bad_row: str) -> FileRows:
    """All rows of local JSONL/JSON/CSV/Parquet files.

    Raises ConfigError naming the file (and line) for a missing, unreadable or empty file, and for a
    line that is not a row (invalid JSON, not an object, not UTF-8, a CSV row with the wrong number of
    fields) unless `on_bad_row` is "skip", which skips and counts it.
    """
    paths = [resolve_project_path(f) for f in files]
    for path in paths:
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "not found"
            raise ConfigError(f"data file '{path}' {what}; check data.train_files / data.eval_files")
        if path.suffix not in FORMATS:
            raise ConfigError(
                f"data file '{path}': unknown format '{path.suffix}'; use one of {list(FORMATS)}"
            )
    out = FileRows()
    for path in paths:
        before = len(out.rows) + out.skipped_lines
        reader = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}[path.suffix]
        for where, row in reader(path):
            if isinstance(row, _BadLine):
                if on_bad_row != "skip":
                    raise ConfigError(f"{where}: {row}; fix the line or set data.on_bad_row: skip")
                out.skipped_lines += 1
                continue
            out.rows.append(row)
            out.where.append(where)
        if len(out.rows) + out.skipped_lines == before:
            raise ConfigError(
                f"data file '{path}' holds no rows; check the path or remove it from data.*_files"
            )
    return out


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigError(f"data file '{path}' cannot be read: {err.strerror or err}") from None


def _decode(path: Path, line_no: int, raw: bytes) -> str | _BadLine:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return _BadLine(
            f"not UTF-8 text (byte {err.start + 1} of the line is {raw[err.start : err.start + 1]!r}); "
            "re-save the file as UTF-8"
        )


def _jsonl(path: Path) -> Any:
    for line_no, raw in enumerate(_read_bytes(path).splitlines(), start=1):
        where = f"{path.name} line {line_no}"
        text = _decode(path, line_no, raw)
        if isinstance(text, _BadLine):
            yield where, text
            continue
        if not text.strip():  # blank lines (a trailing newline, spacing) hold no row
            continue
        yield where, _json_row(text)


def _json_row(text: str) -> dict[str, Any] | _BadLine:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        return _BadLine(f"invalid JSON ({err.msg} at column {err.colno})")
    except RecursionError:
        return _BadLine("invalid JSON (nested too deeply)")
    if not isinstance(row, dict):
        return _BadLine(f"a JSON {type(row).__name__}, not an object with named fields")
    return row


def _json(path: Path) -> Any:
    """A .json file: one JSON array of objects, or JSON Lines under a .json name."""
    raw = _read_bytes(path)
    try:
        whole = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        yield from _jsonl(path)  # line-level reading names the broken line
        return
    rows = whole if isinstance(whole, list) else [whole]
    for index, row in enumerate(rows):
        where = f"{path.name} item {index}"
        yield where, row if isinstance(row, dict) else _BadLine(f"a JSON {type(row).__name__}, not an object")


def _csv(path: Path) -> Any:
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line_no = raw[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{path.name} line {line_no}: not UTF-8 text (byte {raw[err.start : err.start + 1]!r}); "
            "re-save the file as UTF-8"
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as err:
        raise ConfigError(f"{path.name} line 1: not a CSV header ({err})") from None
    if not header:
        return
    if len(set(header)) != len(header) or not all(h.strip() for h in header):
        raise ConfigError(
            f"{path.name} line 1: the CSV header {header} needs distinct, non-empty column names"
        )
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            yield f"{path.name} line {reader.line_num}", _BadLine(f"not a CSV row ({err})")
            continue
        where = f"{path.name} line {reader.line_num}"
        if not cells:
            continue
        if len(cells) != len(header):
            yield (
                where,
                _BadLine(f"{len(cells)} fields, but the header has {len(header)} ({', '.join(header)})"),
            )
            continue
        yield where, dict(zip(header, cells, strict=True))


def _parquet(path: Path) -> Any:
    import datasets

    datasets.disable_progress_bars()
    try:
        loaded = datasets.load_dataset("parquet", data_files=[str(path)], split="train")
    except Exception as err:  # a corrupt or non-parquet file: pyarrow's message says what is wrong
        raise ConfigError(f"data file '{path}' is not a readable Parquet file: {err}") from None
    for index, row in enumerate(loaded):
        yield f"{path.name} row {index}", dict(row)
