"""End-to-end GRPO throughput: grpo-ray's own driver loop vs TRL's GRPOTrainer on the same workload.

grpo-ray runs exactly as `grpo-ray train` does (`cluster.driver.run` on configs/demo.yaml turned
into the workload); the benchmark only wraps the driver's `sync` to read the sync payload's size
once, before the first step, and reads each step's wall time (`time/step`) from metrics.jsonl. TRL runs in
benchmarks/trl_baseline.py. Each repeat runs both, in alternating order, each in a fresh process.

Throughput = completion tokens of the timed steps / wall time from the first timed step's start to
the last one's end. The per-step split (generate / reward / train / sync / idle) comes from the
driver's own `time/*` metrics; idle is the step's wall time minus their sum.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from benchmarks import trl_baseline
from benchmarks.common import (
    WORKLOAD,
    Settings,
    bench_config,
    child_main,
    fmt_range,
    goal_check,
    local_ray,
    ratio_summary,
    rotated,
    run_child,
    summary,
    throughput,
)

GOAL = 2.0  # grpo-ray tokens/s over TRL's
PARTS = ("generate", "reward", "train", "sync")


def grpo_ray_spec(
    settings: Settings, quantization: str, sync: str = "merged", workers: int = 2
) -> dict[str, Any]:
    return {
        "kind": "grpo_ray",
        "model": str(settings.model),
        "quantization": quantization,
        "sync": sync,
        "workers": workers,
        "warmup": settings.warmup_steps,
        "timed": settings.timed_steps,
        "cores": settings.cores,
    }


def run(settings: Settings) -> dict[str, Any]:
    variants = ["nf4"] if settings.quick else ["nf4", "none"]
    trl_reason = trl_baseline.skip_reason(settings)
    section: dict[str, Any] = {"goal": GOAL, "variants": {}}
    for quantization in variants:
        sides = {
            "grpo-ray": ("e2e", grpo_ray_spec(settings, quantization)),
            "trl": ("trl_baseline", trl_baseline.spec(settings, quantization)),
        }
        names = ["grpo-ray"] if trl_reason else ["grpo-ray", "trl"]
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for r in range(settings.repeats):
            for name in rotated(names, r):
                module, spec = sides[name]
                runs[name].append(run_child(module, spec, settings, f"e2e-{quantization}-{name}-{r}"))
        section["variants"][quantization] = _summarise(runs, trl_reason)
    return section


def _summarise(runs: dict[str, list[dict[str, Any]]], trl_reason: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": runs}
    for name, side_runs in runs.items():
        out[name] = {
            "tokens_per_s": summary([r["tokens_per_s"] for r in side_runs]),
            "s_per_step": summary([r["s_per_step"] for r in side_runs]),
            "breakdown_s": {
                part: summary([r["breakdown_s"][part] for r in side_runs])
                for part in side_runs[0]["breakdown_s"]
            },
        }
    if trl_reason:
        out["trl"] = {"skipped": trl_reason}
    else:
        out["ratio"] = ratio_summary(
            [r["tokens_per_s"] for r in runs["grpo-ray"]], [r["tokens_per_s"] for r in runs["trl"]]
        )
    return out


# ---- the grpo-ray side (a child process) ---------------------------------------------------------


def grpo_ray_child(spec: dict[str, Any]) -> dict[str, Any]:
    """`cluster.driver.run` on the workload, timing each step; also used by benchmarks/sync_cost.py."""
    import cluster.driver as driver

    warmup, timed = spec["warmup"], spec["timed"]
    cfg = bench_config(
        spec["model"],
        steps=warmup + timed,
        run_root=spec["tmp_dir"],
        quantization=spec["quantization"],
        sync=spec["sync"],
        workers=spec["workers"],
        cores=spec["cores"],
    )
    payload: dict[str, float] = {}
    original_sync = driver.sync

    def measured_sync(cfg_: Any, learner: Any, pool: Any, include_base: bool, slots: Any = None) -> Any:
        begin = time.perf_counter()
        result = original_sync(cfg_, learner, pool, include_base, slots)
        if include_base and not payload:  # the run's first sync, before step 1: not in any timed step
            payload["first_sync_s"] = time.perf_counter() - begin
            payload["first_sync_bytes"] = update_bytes(cfg_, learner, include_base=True)
            payload["sync_bytes"] = update_bytes(cfg_, learner, include_base=False)
        return result

    driver.sync = measured_sync  # type: ignore[assignment]
    with local_ray():
        driver.run(cfg, echo=lambda *a: print(*a, flush=True))
    steps = steps_from_metrics(cfg.run_dir)
    return summarise_steps([s for s in steps if s["step"] > warmup], payload)


def steps_from_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Each trained step's metrics with its wall span: `time/step` is the time from the previous
    step's update ending to this one's, so consecutive spans tile the run's step loop."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    steps, clock = [], 0.0
    for values in (r for r in rows if "train/loss" in r):
        begin, clock = clock, clock + float(values["time/step"])
        steps.append(
            {
                "step": values["step"],
                "begin": begin,
                "end": clock,
                "values": values,
                "worker_load_s": [float(values["sync/worker_load_s_max"])],
            }
        )
    return steps


def update_bytes(cfg: Any, learner: Any, include_base: bool) -> float:
    """Bytes one sync puts in the object store, for the kinds cluster.policy_sync.sync exports."""
    from cluster.policy_sync import sync_kinds

    return float(sum(payload_bytes(learner, kind, base) for kind, base in sync_kinds(cfg, include_base)))


def payload_bytes(learner: Any, kind: str, include_base: bool) -> int:
    """`WeightUpdate.num_bytes` of one export, read where the object store has it (not in the driver)."""
    import ray

    update_ref, _ = learner.export_for_sync(kind, include_base)  # a learner.data_parallel.LearnerGroup
    return int(ray.get(ray.remote(num_cpus=0)(_num_bytes).remote(update_ref)))


def _num_bytes(update: Any) -> int:
    return int(update.num_bytes)


def summarise_steps(steps: list[dict[str, Any]], payload: dict[str, float]) -> dict[str, Any]:
    rows = []
    for s in steps:
        v = s["values"]
        parts = {part: float(v[f"time/{part}"]) for part in PARTS}
        wall = s["end"] - s["begin"]
        rows.append(
            {
                "wall_s": wall,
                **{f"{p}_s": t for p, t in parts.items()},
                "idle_s": wall - sum(parts.values()),
                "tokens": float(v["rollout/completion_len_mean"]) * WORKLOAD.sequences,
                "learner_compute_s": float(v["train/seconds"]),  # inside the learner actor
                "worker_load_s": max(s["worker_load_s"]),  # slowest worker's checksum + in-place load
            }
        )
    span = steps[-1]["end"] - steps[0]["begin"]
    n = len(rows)
    return {
        **throughput(rows, span, (*PARTS, "idle", "learner_compute")),
        "sync_share": sum(r["sync_s"] / r["wall_s"] for r in rows) / n,
        **payload,
    }


# ---- markdown ------------------------------------------------------------------------------------


def markdown(section: dict[str, Any]) -> list[str]:
    lines = [
        "## 1. End-to-end GRPO throughput (grpo-ray vs TRL GRPOTrainer)",
        "",
        f"Goal: grpo-ray >= {section['goal']:.1f}x TRL (completion tokens/s over the timed steps).",
        "",
        "| base | system | tokens/s | s/step | ratio vs TRL | goal |",
        "|---|---|---|---|---|---|",
    ]
    for quantization, v in section["variants"].items():
        base = "NF4 + LoRA" if quantization == "nf4" else "plain LoRA"
        ratio = v.get("ratio")
        verdict = goal_check(ratio["median"], section["goal"]) if ratio else "–"
        lines.append(
            f"| {base} | grpo-ray | {fmt_range(v['grpo-ray']['tokens_per_s'], 1)} | "
            f"{fmt_range(v['grpo-ray']['s_per_step'], 1)} | {fmt_range(ratio, 2, unit='x')} | {verdict} |"
        )
        trl = v["trl"]
        if "skipped" in trl:
            lines.append(f"| {base} | TRL | skipped: {trl['skipped']} | | | |")
        else:
            lines.append(
                f"| {base} | TRL | {fmt_range(trl['tokens_per_s'], 1)} | {fmt_range(trl['s_per_step'], 1)} | | |"
            )
    lines += [
        "",
        "TRL's step split (transformers generate / reward / the rest: logprobs, loss, backward, optimiser):",
        "",
    ]
    lines += ["| base | generate s | reward s | rest s |", "|---|---|---|---|"]
    for quantization, v in section["variants"].items():
        if "breakdown_s" in v["trl"]:
            b = v["trl"]["breakdown_s"]
            lines.append(
                f"| {quantization} | {fmt_range(b['generate'], 1)} | {fmt_range(b['reward'], 2)} | "
                f"{fmt_range(b['train'], 1)} |"
            )
    return lines


def breakdown_markdown(section: dict[str, Any]) -> list[str]:
    lines = [
        "## 5. grpo-ray step-time breakdown",
        "",
        "Seconds per step (mean over a run's timed steps; median (min–max) over runs). idle = step wall "
        "time − (generate + reward + train + sync). 'learner compute' is the part of train spent inside "
        "the learner actor (`train/seconds`); the rest of train is moving the batch to it.",
        "",
        "| base | step | generate | reward | train | (learner compute) | sync | idle |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for quantization, v in section["variants"].items():
        b = v["grpo-ray"]["breakdown_s"]
        lines.append(
            f"| {quantization} | {fmt_range(v['grpo-ray']['s_per_step'], 1)} | {fmt_range(b['generate'], 1)} | "
            f"{fmt_range(b['reward'], 2)} | {fmt_range(b['train'], 1)} | {fmt_range(b['learner_compute'], 1)} | "
            f"{fmt_range(b['sync'], 2)} | {fmt_range(b['idle'], 2)} |"
        )
    return lines


if __name__ == "__main__":
    child_main({"grpo_ray": grpo_ray_child})
