"""pyproject's package list matches the tree, and the shipped data is found by name from anywhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from cluster.cli import main
from cluster.config import load_config
from grpo_ray.shipped import data_root, shipped_configs

ROOT = Path(__file__).resolve().parents[2]
CODE = ("grpo_ray", "rollout", "learner", "rewards", "cluster")


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_code_package_on_disk_is_packaged_and_data_is_not_code() -> None:
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in CODE
        for init in (ROOT / top).rglob("__init__.py")
    }
    settings = _setuptools()
    mapped = settings["package-dir"]
    assert mapped == {"grpo_ray.configs": "configs", "grpo_ray.assets": "assets"}
    assert set(settings["packages"]) - set(mapped) == on_disk, "add the new package to pyproject.toml"
    for folder in mapped.values():  # data, not importable packages
        assert not (ROOT / folder / "__init__.py").exists(), folder


def test_shipped_configs_by_name_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert data_root() == ROOT  # a checkout: the repository root holds configs/ and assets/
    assert {"demo", "gsm8k_qwen2.5-3b_24gb"} <= set(shipped_configs())
    monkeypatch.chdir(tmp_path)
    by_name, by_path = load_config("demo"), load_config("configs/demo.yaml")
    assert by_name == by_path
    assert by_name.resolve_path(by_name.model) == ROOT / "assets" / "tiny-qwen2"
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert "demo" in out.split() and str(ROOT / "configs" / "demo.yaml") in out
    assert main(["check", "no-such-config"]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "demo" in err and "Traceback" not in err
