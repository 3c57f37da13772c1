"""The import layers, checked over the source with `ast` (every import, function-local ones too).

    grpo_ray/                      imports nothing of the project (the leaf: records, config base, ...)
    rollout/, learner/, rewards/   import grpo_ray and themselves only; never each other, never cluster
    cluster/                       the orchestration: may import all of them

`.ci/run` runs this file first, so a layering break fails in seconds.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ("grpo_ray", "rollout", "learner", "rewards", "cluster")
ALLOWED: dict[str, set[str]] = {
    "grpo_ray": {"grpo_ray"},
    "rollout": {"grpo_ray", "rollout"},
    "learner": {"grpo_ray", "learner"},
    "rewards": {"grpo_ray", "rewards"},
    "cluster": set(PROJECT),
}


def project_imports(path: Path, own: str) -> list[tuple[int, str]]:
    """(line, top-level project package) of every import in the file, wherever it sits in the file,
    in line order. Relative imports count as the file's own package `own`. String imports (`importlib.import_module("...")`) are not seen; the project has none
    of its own packages.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [own] if node.level else [node.module or ""]
        else:
            continue
        found += [(node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in PROJECT]
    return sorted(found)


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PROJECT)
def test_imports_flow_one_way(package: str) -> None:
    files = _sources(package)
    assert files, f"no python files under {package}/"
    upward = [
        f"{path.relative_to(ROOT)}:{line} imports {target}"
        for path in files
        for line, target in project_imports(path, package)
        if target not in ALLOWED[package]
    ]
    assert not upward, (
        f"{package}/ may import only {sorted(ALLOWED[package])}; move the shared piece down into "
        "grpo_ray/ (or the orchestration up into cluster/):\n  " + "\n  ".join(upward)
    )


def test_the_checker_sees_function_local_and_relative_imports(tmp_path: Path) -> None:
    # A file that hides an upward import inside a function, and a relative one, as a regression would.
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def f():\n    from cluster.config import RunConfig\n    import learner.grpo\nfrom . import engine\n"
    )
    assert project_imports(probe, "rollout") == [(2, "cluster"), (3, "learner"), (4, "rollout")]
