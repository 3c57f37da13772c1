"""Synchronous vs asynchronous rollouts (max_staleness = 0, 1, 2), resource-fair on a CPU.

    flock /work/bench.lock .venv/bin/python -m benchmarks.async_overlap [--steps 8] [--warmup 2] [--repeats 2]

On 2 cores the phases compete for the same cores when both may use both, so overlap cannot pay.
Here each side gets its own core instead: the one rollout engine is pinned to core 0 with one
thread (rollout.cpu_cores=[0]), the learner to core 1 with one thread (learner.cpu_cores=[1]);
the driver, Ray's own processes and the reward scorer are not pinned. Same workload for every
mode (benchmarks/common.py: the 22.9M-parameter benchmark model, 16 prompts x 8 completions of
exactly 64 tokens, NF4 + LoRA), modes alternated per round, each a fresh child process.

Per mode: completion tokens/s over the timed steps (after `--warmup` steps, before the last
max(k) steps of every run, where an async pool has nothing left to sample), the ratio to synchronous, and each side's
utilisation (rollout: 1 - idle/step time from `time/rollout_idle`; learner: `time/train`/step
time). The cost model (benchmarks/step_time_model.py) is fed the synchronous run's measured
phases and its prediction for the async modes is printed beside what they measured; then it is
evaluated for the shipped 7B cluster config under the phase times it states as assumptions.
Writes benchmarks/results/async_overlap.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    BENCH_MODEL,
    DEFAULT_OUT,
    WORKLOAD,
    Settings,
    bench_config,
    child_main,
    fmt_range,
    local_ray,
    machine_info,
    ratio_summary,
    rotated,
    run_child,
    summary,
)
from benchmarks.step_time_model import CLUSTER_7B, CLUSTER_7B_WORKERS, PhaseTimes, speedup, step_time  # noqa: E402

MODES = (0, 1, 2)
# Steps run after the timed ones and left out, in every mode: in the last k steps of a run the pool
# has nothing left to sample (it sampled them ahead), which is the pipeline draining, not its pace.
DRAIN = max(MODES)
PINNED = (
    "rollout.cpu_cores=[0]",
    "rollout.threads_per_worker=1",
    "learner.cpu_cores=[1]",
    "learner.threads=1",
)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Child side: one run at `spec['staleness']`; per-step metrics of the timed steps."""
    from cluster.driver import run

    cfg = bench_config(
        spec["model"],
        steps=spec["warmup"] + spec["steps"] + DRAIN,
        run_root=spec["tmp_dir"],
        name=f"async{spec['staleness']}",
        workers=1,
        cores=1,
        extra=[*PINNED, f"max_staleness={spec['staleness']}", "learner.learning_rate=1.0e-3"],
    )
    with local_ray():
        run(cfg, echo=lambda *a: print(*a, flush=True))
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines() if line]
    last = spec["warmup"] + spec["steps"]
    timed = [r for r in rows if "train/loss" in r and spec["warmup"] < r["step"] <= last]
    keys = ("time/step", "time/generate", "time/reward", "time/train", "time/sync", "time/learner_wait")
    per_step = [{k: float(r[k]) for k in (*keys, "time/rollout_idle", "async/staleness_mean")} for r in timed]
    tokens = sum(float(r["rollout/completion_len_mean"]) * WORKLOAD.sequences for r in timed)
    span = sum(s["time/step"] for s in per_step)
    return {
        "tokens_per_s": tokens / span,
        "s_per_step": span / len(per_step),
        "rollout_util": 1.0 - sum(s["time/rollout_idle"] for s in per_step) / span,
        "learner_util": sum(s["time/train"] for s in per_step) / span,
        "phases_s": {k: sum(s[k] for s in per_step) / len(per_step) for k in (*keys, "async/staleness_mean")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if not (BENCH_MODEL / "config.json").exists():
        from benchmarks.run import ensure_model

        ensure_model(BENCH_MODEL, "bench")
    settings = Settings(
        quick=False,
        repeats=args.repeats,
        warmup_steps=args.warmup,
        timed_steps=args.steps,
        out_dir=args.out,
        log_dir=args.out / "logs",
        model=BENCH_MODEL,
        big_model=BENCH_MODEL,
        trl=False,
        big=False,
        child_timeout_s=1200,
        cores=2,
    )
    machine = machine_info()
    runs: dict[int, list[dict[str, Any]]] = {k: [] for k in MODES}
    for r in range(args.repeats):
        for k in rotated(MODES, r):
            spec = {"kind": "measure", "staleness": k, "steps": args.steps, "warmup": args.warmup}
            result = run_child(
                "async_overlap", {**spec, "model": str(BENCH_MODEL)}, settings, f"async_{k}_{r}"
            )
            runs[k].append(result)
            print(k, r, json.dumps({key: result[key] for key in ("tokens_per_s", "s_per_step")}), flush=True)

    sync_phases = [run["phases_s"] for run in runs[0]]

    def measured_phases(i: int) -> PhaseTimes:
        p = sync_phases[i]
        return PhaseTimes(p["time/generate"], p["time/reward"], p["time/train"], p["time/sync"])

    modes: dict[str, Any] = {}
    for k in MODES:
        modes[str(k)] = {
            "tokens_per_s": summary([run["tokens_per_s"] for run in runs[k]]),
            "s_per_step": summary([run["s_per_step"] for run in runs[k]]),
            "ratio_vs_sync": ratio_summary(
                [run["tokens_per_s"] for run in runs[k]], [run["tokens_per_s"] for run in runs[0]]
            ),
            "rollout_util": summary([run["rollout_util"] for run in runs[k]]),
            "learner_util": summary([run["learner_util"] for run in runs[k]]),
            "predicted_s_per_step": summary(
                [step_time(measured_phases(i), 1, k) for i in range(len(runs[0]))]
            ),
            "staleness_mean": summary([run["phases_s"]["async/staleness_mean"] for run in runs[k]]),
        }
    p0 = sync_phases[0]
    bound = (p0["time/generate"] + p0["time/train"]) / max(p0["time/generate"], p0["time/train"])
    cluster = {
        str(w): {str(k): step_time(CLUSTER_7B, w, k) for k in MODES} for w in (1, 2, CLUSTER_7B_WORKERS, 8)
    }
    out = {"steps": args.steps, "warmup": args.warmup, "runs": runs, "modes": modes, "overlap_bound": bound}
    out["cluster_7b"] = {"assumed_phases_s": CLUSTER_7B.__dict__, "s_per_step_by_workers": cluster}
    out["machine"] = machine
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "async_overlap.json").write_text(json.dumps(out, indent=1))
    (args.out / "async_overlap.md").write_text("\n".join(markdown(out, args)))
    print("\n".join(markdown(out, args)))


def markdown(out: dict[str, Any], args: Any) -> list[str]:
    m = out["machine"]
    lines = [
        "# Asynchronous rollouts: synchronous vs max_staleness 1 and 2, one core each side",
        "",
        f"`python -m benchmarks.async_overlap --steps {args.steps} --warmup {args.warmup} --repeats {args.repeats}`: "
        "the benchmark workload (22.9M random Qwen2, 16 prompts x 8 x 64 tokens, NF4 + LoRA r16), one rollout "
        "engine pinned to core 0 and the learner to core 1, one thread each; modes alternated per round. "
        f"Medians (min–max) over {args.repeats} runs. Load average at start {m['load_average'][0]:.1f}.",
        "",
        "| max_staleness | tokens/s | s/step | async/sync | rollout busy | learner busy | mean staleness "
        "| model's s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, v in out["modes"].items():
        lines.append(
            f"| {k} | {fmt_range(v['tokens_per_s'], 0)} | {fmt_range(v['s_per_step'], 2)} | "
            f"{fmt_range(v['ratio_vs_sync'], 2, unit='x')} | {fmt_range(v['rollout_util'], 2)} | "
            f"{fmt_range(v['learner_util'], 2)} | {fmt_range(v['staleness_mean'], 2)} | "
            f"{fmt_range(v['predicted_s_per_step'], 2)} |"
        )
    lines += [
        "",
        f"Overlap bound (gen + train) / max(gen, train) from the first synchronous run's phases: {out['overlap_bound']:.2f}x.",
        "",
        "## The cost model on the shipped 7B cluster config (assumed phase times, not measured)",
        "",
        "Assumed per step: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in out["cluster_7b"]["assumed_phases_s"].items())
        + " (benchmarks/step_time_model.py says where each comes from).",
        "",
        "| rollout workers | sync s/step | k=1 s/step | k=2 s/step | speedup |",
        "|---|---|---|---|---|",
    ]
    for w, by_k in out["cluster_7b"]["s_per_step_by_workers"].items():
        lines.append(
            f"| {w} | {by_k['0']:.1f} | {by_k['1']:.1f} | {by_k['2']:.1f} | "
            f"{speedup(CLUSTER_7B, int(w), 1):.2f}x |"
        )
    return lines


if __name__ == "__main__":
    if "--spec" in sys.argv:
        child_main({"measure": measure})
    else:
        main()
