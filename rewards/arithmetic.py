"""The synthetic demo task: two-digit addition, ``What is 47+38?`` -> ``85``.

Pure python (no torch) so the dataset builder, the reward side and the tests can share it.

Every ordered pair (a, b) with 10 <= a, b <= 99 is one problem (8,100 in all). A seeded shuffle
puts ``n_test`` pairs, half of them with a carry, in the held-out split and the rest in train, so
the two splits never share a pair. ``forgot_carry_answer`` is the systematic mistake the shipped
tiny model was taught to prefer (see ``scripts/build_tiny_model.py``); it is exposed so
evaluations can count it.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

LO, HI = 10, 99
N_TEST = 300
SEED = 1234  # the shipped assets/arith splits (and the tiny model trained on them) use this seed
SPLITS = ("train", "test")

_QUESTION_RE = re.compile(r"^What is (\d+)\+(\d+)\?$")

Pair = tuple[int, int]
Row = dict[str, str]


def question(a: int, b: int) -> str:
    return f"What is {a}+{b}?"


def answer(a: int, b: int) -> str:
    return str(a + b)


def carry(a: int, b: int) -> bool:
    """True when the ones digits overflow into the tens (about 45% of the problems)."""
    return a % 10 + b % 10 >= 10


def forgot_carry_answer(a: int, b: int) -> str:
    """The sum with the ones-digit carry dropped: 47+38 -> "75". Equals the true sum without a carry."""
    return str(a + b - 10 * carry(a, b))


def parse_question(text: str) -> Pair:
    """Inverse of ``question``; raises ValueError naming the text when it is not one of ours."""
    m = _QUESTION_RE.match(text.strip())
    if m is None:
        raise ValueError(f"not an addition question of the form 'What is A+B?': {text!r}")
    return int(m.group(1)), int(m.group(2))


def all_pairs(lo: int = LO, hi: int = HI) -> list[Pair]:
    return [(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1)]


def split_pairs(seed: int, n_test: int = N_TEST, lo: int = LO, hi: int = HI) -> dict[str, list[Pair]]:
    """Seeded, disjoint train/test split over (a, b) pairs; both keep the shuffled order.

    The test split holds equal numbers of carry and no-carry pairs (all pairs: ~45% carry), so the
    tiny model's greedy accuracy, ~ the no-carry share, sits mid-range rather than near 60%.
    """
    pairs = all_pairs(lo, hi)
    random.Random(seed).shuffle(pairs)
    with_carry = [p for p in pairs if carry(*p)]
    without = [p for p in pairs if not carry(*p)]
    n_carry = n_test // 2
    if not (0 < n_carry < len(with_carry) and 0 < n_test - n_carry < len(without)):
        raise ValueError(f"n_test must be in 2..{2 * min(len(with_carry), len(without)) - 2}, got {n_test}")
    test = set(with_carry[:n_carry] + without[: n_test - n_carry])
    return {"train": [p for p in pairs if p not in test], "test": [p for p in pairs if p in test]}


def to_row(a: int, b: int) -> Row:
    return {"question": question(a, b), "answer": answer(a, b)}


def make_problems(seed: int, n_test: int = N_TEST, lo: int = LO, hi: int = HI) -> dict[str, list[Row]]:
    """The dataset rows of both splits, exactly as ``write_splits`` stores them."""
    return {
        name: [to_row(a, b) for a, b in pairs] for name, pairs in split_pairs(seed, n_test, lo, hi).items()
    }


def write_splits(out_dir: str | Path, seed: int, n_test: int = N_TEST) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` under ``out_dir``; returns the paths by split name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, rows in make_problems(seed, n_test).items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return paths


def read_split(path: str | Path) -> list[Row]:
    """Rows of one jsonl split; a malformed line is reported with its line number."""
    rows: list[Row] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                row = json.loads(line)
                rows.append({"question": str(row["question"]), "answer": str(row["answer"])})
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: expected {{'question': ..., 'answer': ...}}: {e}") from e
    return rows
