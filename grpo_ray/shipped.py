"""Where the shipped data lives: `configs/` and `assets/` of a checkout, or the same folders inside
the installed wheel (packaged as `grpo_ray/configs` and `grpo_ray/assets`; they are data, not modules).

Imports nothing of the project, so the config loader, the CLI and tests find a shipped config or the
tiny demo model the same way from any working directory.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

CONFIGS = "configs"
ASSETS = "assets"


def data_root() -> Path:
    """The directory that holds `configs/` and `assets/`.

    Installed wheel: the `grpo_ray` package directory itself (the wheel maps both folders into it).
    Checkout (or an editable install): the repository root, the parent of `grpo_ray/`.
    Raises RuntimeError if grpo_ray is not installed as plain files (e.g. imported from a zip).
    """
    package = resources.files("grpo_ray")
    if not isinstance(package, Path):
        raise RuntimeError(
            f"grpo_ray must be installed as files on disk to find its shipped data, not {package}"
        )
    return package if (package / CONFIGS).is_dir() else package.parent


def shipped_path(relative: str | Path) -> Path | None:
    """`relative` (e.g. 'assets/tiny-qwen2') under the data root, or None when nothing is there."""
    candidate = data_root() / relative
    return candidate if candidate.exists() else None


def shipped_configs() -> dict[str, Path]:
    """Name -> path of every shipped run config (`demo` -> .../configs/demo.yaml), sorted by name."""
    folder = data_root() / CONFIGS
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))}


def summary_line(config: Path) -> str:
    """A config's first comment line (what it runs), or '' when it starts with no comment."""
    for line in config.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""
