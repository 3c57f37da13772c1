"""Step metrics: where they go (RUN_DIR/metrics.jsonl, wandb if enabled) and how that file is read back.

One record per line, `{"step": N, key: value, ...}`; non-finite floats are written as null. The reader
merges lines by step (a step can be logged in several lines, e.g. training and then eval).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.config import RunConfig


class MetricsSink:
    """Appends each step's metrics to RUN_DIR/metrics.jsonl (flushed per line) and to wandb if enabled."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        self._wandb: Any = None
        if cfg.logging.wandb:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(
                project=cfg.logging.wandb_project,
                name=cfg.name,
                dir=str(run_dir),
                mode=cfg.logging.wandb_mode,
                config=cfg.model_dump(mode="json"),
            )

    def log(self, step: int, values: dict[str, float]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


@dataclass
class Metrics:
    """metrics.jsonl merged by step: `rows[step][key] = value` (a later line wins for the same key)."""

    rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)  # the valid lines as written, in order
    lines: int = 0
    blank_lines: int = 0
    corrupt_lines: int = 0

    @property
    def steps(self) -> list[int]:
        return sorted(self.rows)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """The finite numeric values of `key`, by step (null, NaN, bools and strings left out)."""
        xs: list[int] = []
        ys: list[float] = []
        for step in self.steps:
            value = number(self.rows[step].get(key))
            if value is not None:
                xs.append(step)
                ys.append(value)
        return xs, ys

    def has(self, key: str) -> bool:
        return any(number(row.get(key)) is not None for row in self.rows.values())

    def logged_keys(self) -> set[str]:
        return {k for row in self.rows.values() for k in row}


def number(value: Any) -> float | None:
    """`value` as a finite float, or None for null, NaN/inf, bools, strings and other non-numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def read_metrics(run_dir: Path) -> Metrics:
    """RUN_DIR/metrics.jsonl as `Metrics`: blank or corrupt lines (a file cut short by a killed run)
    are skipped and counted. Raises FileNotFoundError naming the run dir when the file is missing."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in run dir {run_dir} (looked for {path})")
    metrics = Metrics()
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        metrics.lines += 1
        if not line.strip():
            metrics.blank_lines += 1
            continue
        try:
            record = json.loads(line)
        except ValueError:
            metrics.corrupt_lines += 1
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, int):
            metrics.corrupt_lines += 1
            continue
        metrics.records.append(record)
        metrics.rows.setdefault(step, {}).update({k: v for k, v in record.items() if k != "step"})
    return metrics
