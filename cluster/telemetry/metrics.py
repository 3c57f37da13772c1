"""Where step metrics go: a JSONL file in the run directory, the progress bar, and wandb if enabled."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from cluster.config import RunConfig


class MetricsSink:
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


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )
