"""Helpers for `ray job submit`: the runtime env a job runs in, and a size check before the upload.

From the repository root, with the dashboard tunnel open (`ray dashboard cluster/cluster.yaml`)::

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 \\
        --runtime-env-json "$(python -m cluster.cli job runtime-env)" \\
        -- python -m cluster.cli train configs/gsm8k_qwen2.5-7b_cluster.yaml

`python -m cluster.cli job runtime-env` (`grpo-ray job runtime-env` once installed) prints the
runtime env as JSON: this checkout as the job's `working_dir` (Ray zips and uploads it; on the
cluster it is the job's current directory and is on `sys.path`, so `python -m cluster.cli` and
relative paths in configs work), the excludes below,
and the credentials in FORWARDED_ENV that are set here, forwarded by name. It first checks the
upload size and exits with the largest paths if the checkout is too big to ship.

`cluster/runtime_env.yaml` holds the same excludes for `ray job submit --runtime-env
cluster/runtime_env.yaml`, which forwards no credentials and checks nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

# Never uploaded with a job: VCS data, the local venv (the cluster has its own), run outputs and
# checkpoints (they can be GBs and belong on shared storage), tool caches. Patterns use .gitignore
# syntax, as Ray's `excludes` does: a name without a slash matches at any depth, a trailing slash
# matches directories only.
RUNTIME_ENV_EXCLUDES: tuple[str, ...] = (
    ".git",
    ".venv",
    "runs/",
    "checkpoints",
    "wandb/",
    "__pycache__",
    "*.egg-info",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
)

# Credentials and cache locations the job needs when they are set where the job is submitted from.
# Forwarded by name into runtime_env.env_vars; the values never appear in a file of this repository.
FORWARDED_ENV: tuple[str, ...] = (
    "WANDB_API_KEY",
    "WANDB_MODE",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_HOME",
)

# Ray 2.60 refuses a working_dir package whose *zipped* size reaches GCS_STORAGE_MAX_SIZE, the gRPC
# message cap RAY_max_grpc_message_size (512 MiB by default; ray/_private/runtime_env/packaging.py),
# and warns from half of that. This project's limit is lower on purpose and measured on the
# *unzipped* files: a checkout plus the tiny demo model is ~1 MiB, so 100 MiB only trips when data,
# checkpoints or a model were left in the tree, and every job submission re-uploads what changed.
DEFAULT_UPLOAD_LIMIT_BYTES = 100 * 2**20

# A file only a grpo-ray checkout has at this path: what `grpo-ray job runtime-env` checks first.
CHECKOUT_SENTINEL = Path("cluster") / "cli.py"


def forwarded_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The FORWARDED_ENV variables that are set (non-empty) in `environ` (default: os.environ)."""
    source = os.environ if environ is None else environ
    return {name: source[name] for name in FORWARDED_ENV if source.get(name)}


def runtime_env(working_dir: Path, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The runtime env for `ray job submit --runtime-env-json`: working_dir, excludes, env_vars."""
    return {
        "working_dir": str(Path(working_dir).resolve()),
        "excludes": list(RUNTIME_ENV_EXCLUDES),
        "env_vars": forwarded_env(environ),
    }


def _pathspec(lines: Sequence[str]) -> Any:
    # The gitwildmatch implementation Ray itself matches `excludes` and ignore files with, so the
    # files counted here are the files Ray zips.
    from ray._private.thirdparty.pathspec import PathSpec

    return PathSpec.from_lines("gitwildmatch", list(lines))


def upload_files(
    working_dir: Path, excludes: Sequence[str] = RUNTIME_ENV_EXCLUDES
) -> Iterator[tuple[Path, int]]:
    """(relative path, size in bytes) of every file Ray would package from `working_dir`.

    Mirrors Ray's traversal: `excludes` are matched against the path relative to `working_dir`, and
    each directory's .gitignore (unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1) and .rayignore apply to
    the paths under it; an excluded directory is not entered.
    """
    root = Path(working_dir).resolve()
    use_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    root_spec = _pathspec(excludes)

    def walk(directory: Path, specs: list[tuple[Path, Any]]) -> Iterator[tuple[Path, int]]:
        specs = list(specs)
        for name in ((".gitignore",) if use_gitignore else ()) + (".rayignore",):
            ignore_file = directory / name
            if ignore_file.is_file():
                specs.append((directory, _pathspec(ignore_file.read_text().splitlines())))
        for entry in sorted(directory.iterdir()):
            if any(spec.match_file(str(entry.relative_to(base))) for base, spec in specs):
                continue
            if entry.is_dir() and not entry.is_symlink():
                yield from walk(entry, specs)
            elif entry.is_file():  # follows symlinks, as the zip does; dangling links are skipped
                yield entry.relative_to(root), entry.stat().st_size

    yield from walk(root, [(root, root_spec)])


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def check_upload_size(working_dir: Path, limit_bytes: int = DEFAULT_UPLOAD_LIMIT_BYTES) -> None:
    """Raise ValueError naming the 5 largest top-level paths if the upload exceeds `limit_bytes`."""
    total = 0
    by_top: dict[str, int] = {}
    for rel, size in upload_files(working_dir):
        total += size
        top = rel.parts[0] + ("/" if len(rel.parts) > 1 else "")
        by_top[top] = by_top.get(top, 0) + size
    if total <= limit_bytes:
        return
    largest = sorted(by_top.items(), key=lambda item: (-item[1], item[0]))[:5]
    width = max(len(path) for path, _ in largest)
    lines = "\n".join(f"  {path:<{width}}  {_mib(size)}" for path, size in largest)
    raise ValueError(
        f"the job's working_dir {Path(working_dir).resolve()} would upload {_mib(total)} "
        f"(after excludes), over the {_mib(limit_bytes)} limit. Largest paths:\n{lines}\n"
        "Fix: move data, checkpoints and model weights out of the checkout (jobs read them from "
        "shared storage or the hub), or exclude them: a .rayignore file at the repository root "
        "(.gitignore syntax), or RUNTIME_ENV_EXCLUDES in cluster/job.py."
    )
