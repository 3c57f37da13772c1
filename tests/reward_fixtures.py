"""Small reward functions with known failure modes, for the scorer tests.

The scorer's workers import them by path (``reward_fixtures:raises``), so ``tests/`` must be on the
trainer's ``sys.path`` when the scorer starts; the workers inherit it. Behaviour is driven by row fields
so one scorer can exercise every mode.
"""

from __future__ import annotations

import os
import time
from typing import Any


def length(completions: list[str], rows: list[dict[str, Any]], **kwargs: Any) -> list[float | None]:
    """The completion's length in characters: a well-behaved reward."""
    return [float(len(c)) for c in completions]


def echo(completions: list[str], rows: list[dict[str, Any]], *, field: str = "value") -> list[Any]:
    """Returns row[field] as is (default 1.0): None, NaN, inf, strings... reach the scorer unchanged."""
    return [row.get(field, 1.0) for row in rows]


def raises(completions: list[str], rows: list[dict[str, Any]], **kwargs: Any) -> list[float | None]:
    """1.0, but raises on rows with "raise": ValueError, or TypeError (a bug inside the body) if asked."""
    for row in rows:
        if row.get("raise") == "type":
            return [len(row) + "x" for row in rows]  # type: ignore[operator]  # TypeError inside the body
        if row.get("raise"):
            raise ValueError(f"boom on gold {row['gold']!r}")
    return [1.0] * len(completions)


def hangs(completions: list[str], rows: list[dict[str, Any]], **kwargs: Any) -> list[float | None]:
    """0.5, but sleeps (practically) forever on rows with "hang"."""
    if any(row.get("hang") for row in rows):
        time.sleep(3600)
    return [0.5] * len(completions)


def crashes(completions: list[str], rows: list[dict[str, Any]], **kwargs: Any) -> list[float | None]:
    """1.0, but kills its own process on rows with "crash" (like a segfault or the OOM killer)."""
    if any(row.get("crash") for row in rows):
        os._exit(3)
    return [1.0] * len(completions)


def scaled(completions: list[str], rows: list[dict[str, Any]], *, factor: float = 1.0) -> list[float | None]:
    """``factor`` per sample: checks that term kwargs reach the function."""
    return [factor] * len(completions)


def wrong_length(completions: list[str], rows: list[dict[str, Any]], **kwargs: Any) -> list[float | None]:
    return [1.0] * (len(completions) + 1)


def not_a_list(completions: list[str], rows: list[dict[str, Any]], **kwargs: Any) -> float:
    return 1.0


def one_arg(completion: str) -> float:
    """Wrong signature: scores one completion instead of a batch."""
    return 1.0


def always_raises(completions: list[str], rows: list[dict[str, Any]], **kwargs: Any) -> list[float | None]:
    raise RuntimeError("the reward server is down")


NOT_CALLABLE = 42


_LEAKED: list[bytes] = []


def leaks(completions: list[str], rows: list[dict[str, Any]], *, mib: int = 64) -> list[float | None]:
    """1.0, but keeps `mib` MiB per call alive in a module global (a leak); written, so it is resident."""
    _LEAKED.append(b"\x01" * (mib << 20))
    return [1.0] * len(completions)


def balloons(completions: list[str], rows: list[dict[str, Any]], **kwargs: Any) -> list[float | None]:
    """1.0, but a row with "balloon": N holds N MiB for a while inside the call."""
    for row in rows:
        if row.get("balloon"):
            held = b"\x01" * (int(row["balloon"]) << 20)
            time.sleep(3.0)
            del held
    return [1.0] * len(completions)


def chatty(completions: list[str], rows: list[dict[str, Any]], *, mib: int = 10) -> list[float | None]:
    """1.0, after printing `mib` MiB through Python's stdout and a line through fd 2 (native code)."""
    import sys

    sys.stdout.write(("x" * 1023 + "\n") * (mib * 1024))
    sys.stdout.flush()
    os.write(2, b"native stderr line, the last thing printed\n")
    return [1.0] * len(completions)
