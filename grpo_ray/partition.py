"""Split n items into k contiguous parts whose sizes differ by at most one (earlier parts larger)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def even_counts(total: int, parts: int) -> list[int]:
    """Sizes of `parts` contiguous parts of `total` items: the first `total mod parts` get one more.

    even_counts(5, 2) == [3, 2]; even_counts(2, 3) == [1, 1, 0]. Raises ValueError if parts < 1 or
    total < 0.
    """
    if parts < 1 or total < 0:
        raise ValueError(f"cannot split {total} items into {parts} parts (need parts >= 1, total >= 0)")
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def split_by_counts(items: Sequence[T], counts: Sequence[int]) -> list[list[T]]:
    """`items` cut into consecutive slices of the given sizes (ValueError unless they sum to len(items))."""
    if sum(counts) != len(items):
        raise ValueError(f"counts {list(counts)} sum to {sum(counts)}, not to the {len(items)} items")
    out, start = [], 0
    for count in counts:
        out.append(list(items[start : start + count]))
        start += count
    return out


def split_evenly(items: Sequence[T], parts: int) -> list[list[T]]:
    """`items` in `parts` contiguous slices sized by `even_counts` (trailing ones empty if parts > n)."""
    return split_by_counts(items, even_counts(len(items), parts))
