"""The run directory: checked writable before anything starts, and a previous run set aside, never lost.

A fresh run never overwrites an earlier one's checkpoints or metrics: the earlier run's directory
(and only it) is renamed to `NAME.previous-<time>` next to it. Anything that is not exactly one run
directory inside run_root (run_root itself, a directory outside it, one that holds no run) is refused.
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from cluster.config import ConfigError, RunConfig

# What a grpo-ray run directory holds; a directory with none of these is not ours to move.
_RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "adapter")


def check_run_root_writable(cfg: RunConfig) -> Path:
    """Create run_root if needed and prove a file can be written in it; ConfigError with the reason."""
    root = Path(cfg.run_root).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".grpo-ray-write-check-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"run_root '{root}': {describe_os_error(err)}; set run_root to a writable directory"
        ) from None
    return root


def describe_os_error(err: OSError) -> str:
    """One line for an OSError a user can fix (read-only filesystem, permissions, disk full)."""
    reason = {
        errno.EROFS: "the filesystem is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
    }.get(err.errno or 0, err.strerror or str(err))
    where = f" ({err.filename})" if err.filename else ""
    return f"cannot write{where}: {reason}"


def set_aside_previous_run(run_dir: Path, run_root: Path, echo: Any) -> Path | None:
    """Move an earlier run in `run_dir` aside (returns where); None when there is nothing to move.

    Raises ConfigError, moving nothing, when `run_dir` is not a single directory inside `run_root`
    or holds files that are not a grpo-ray run.
    """
    root, target = os.path.realpath(run_root), os.path.realpath(run_dir)
    if os.path.dirname(target) != root or target == root:
        raise ConfigError(
            f"run directory '{run_dir}' is not one directory inside run_root '{run_root}'; "
            "give `name` as a plain directory name"
        )
    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return None
    if not run_dir.is_dir() or not any((run_dir / marker).exists() for marker in _RUN_MARKERS):
        raise ConfigError(
            f"'{run_dir}' already exists and is not a grpo-ray run directory; it is left untouched: choose "
            "another name or run_root"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = run_dir.with_name(f"{run_dir.name}.previous-{stamp}")
    count = 1
    while aside.exists():
        count += 1
        aside = run_dir.with_name(f"{run_dir.name}.previous-{stamp}-{count}")
    run_dir.rename(aside)
    echo(f"an earlier run in {run_dir} was moved to {aside} (use --resume to continue a run instead)")
    return aside
