"""Where grpo-ray keeps what outlives a run on this machine (the prompt-token cache, the warm pool)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path | None:
    """$GRPO_RAY_CACHE_DIR, else $XDG_CACHE_HOME/grpo-ray, else ~/.cache/grpo-ray.

    None when none is set and the user has no home directory (a container's bare UID).
    """
    root = os.environ.get("GRPO_RAY_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        if not xdg:
            try:
                xdg = str(Path.home() / ".cache")
            except (RuntimeError, KeyError):
                return None
        root = str(Path(xdg) / "grpo-ray")
    return Path(root).expanduser()
