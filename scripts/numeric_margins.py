"""Print how close each numeric test bound came: the largest measured/allowed ratio per bound.

    GRPO_NUMERIC_LOG=/tmp/numeric.jsonl scripts/test.sh -m numeric
    python scripts/numeric_margins.py /tmp/numeric.jsonl

tests/bounds.py appends one JSON line per check (test, bound, measured, allowed) to GRPO_NUMERIC_LOG.
Step numbers and parameter ids are folded together, so each bound is one row; a ratio above 1 failed.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def worst_ratios(lines: list[str]) -> dict[str, tuple[float, float, float]]:
    worst: dict[str, tuple[float, float, float]] = {}
    for line in lines:
        if not line.strip():
            continue
        row = json.loads(line)
        test = re.sub(r"\[.*\]$", "", row["test"].split("/")[-1])
        bound = re.sub(r"\b(zero\d|resumed)?\s*step \d+( after restore)?\s*", "", row["bound"])
        key = f"{test} :: {bound}"
        ratio = row["measured"] / row["allowed"] if row["allowed"] else float("inf")
        if key not in worst or ratio > worst[key][0]:
            worst[key] = (ratio, row["measured"], row["allowed"])
    return worst


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    rows = worst_ratios(Path(sys.argv[1]).read_text().splitlines())
    print(f"{'measured/allowed':>16}  {'measured':>10}  {'allowed':>10}  bound")
    for key, (ratio, measured, allowed) in sorted(rows.items()):
        print(f"{ratio:16.3g}  {measured:10.3g}  {allowed:10.3g}  {key}")


if __name__ == "__main__":
    main()
