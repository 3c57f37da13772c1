"""Reading a run directory for the report: its config.yaml and its last eval/*.jsonl.

Metrics are read by `cluster.telemetry.metrics.read_metrics`, the one reader of metrics.jsonl.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_EVAL_STEP = re.compile(r"eval_step_(\d+)\.jsonl$")


def read_config(run_dir: Path) -> tuple[str | None, dict[str, Any]]:
    """(RUN_DIR/config.yaml text, parsed mapping); (None, {}) if absent, {} if it does not parse."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None, {}
    text = path.read_text(errors="replace")
    try:
        import yaml

        parsed = yaml.safe_load(text)
    except Exception:
        parsed = None
    return text, parsed if isinstance(parsed, dict) else {}


@dataclass
class EvalResults:
    path: Path
    step: int | None
    records: list[dict[str, Any]]
    corrupt_lines: int


def last_eval(run_dir: Path) -> EvalResults | None:
    """The newest RUN_DIR/eval/eval_*.jsonl (highest step), records sorted by index; None if none."""
    files = list((run_dir / "eval").glob("eval_*.jsonl"))
    if not files:
        return None

    def order(p: Path) -> tuple[int, str]:
        match = _EVAL_STEP.search(p.name)
        return (int(match.group(1)) if match else -1, p.name)

    path = max(files, key=order)
    records: list[dict[str, Any]] = []
    corrupt = 0
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            corrupt += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            corrupt += 1
    if all(isinstance(r.get("index"), int) and not isinstance(r.get("index"), bool) for r in records):
        records.sort(key=lambda r: r["index"])
    step = order(path)[0]
    return EvalResults(path, step if step >= 0 else None, records, corrupt)
