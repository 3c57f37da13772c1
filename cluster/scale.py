"""Resizing a running rollout pool: `grpo-ray scale RUN_DIR N` writes RUN_DIR/pool_size; the driver
reads it at every step boundary and starts or removes workers to match.

A file, not an RPC: it works from any shell that sees the run directory (the head node, where
`ray job submit` runs the driver), survives a driver restart (a resumed run honours it over
rollout.num_workers until the file is removed), and needs no port or credentials.
"""

from __future__ import annotations

import os
from pathlib import Path

from cluster.config import ConfigError

FILE_NAME = "pool_size"


def request_pool_size(run_dir: Path, workers: int) -> Path:
    """Ask the run in `run_dir` for `workers` rollout workers (written atomically)."""
    if workers < 1:
        raise ConfigError(f"scale: a run needs at least one rollout worker, got {workers}")
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"scale: '{run_dir}' is not a run directory (no config.yaml); give RUN_ROOT/NAME")
    path = run_dir / FILE_NAME
    partial = path.with_suffix(".partial")
    partial.write_text(f"{workers}\n")
    os.replace(partial, path)  # the driver never reads half a number
    return path


def requested_pool_size(run_dir: Path) -> tuple[int | None, str | None]:
    """(requested size, None), (None, None) when nothing is requested, or (None, problem) for a bad file."""
    path = run_dir / FILE_NAME
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None, None
    try:
        workers = int(text)
    except ValueError:
        return None, f"{path} holds {text!r}, not a number of workers; rewrite it with `grpo-ray scale`"
    if workers < 1:
        return None, f"{path} asks for {workers} workers; a run needs at least one"
    return workers, None
