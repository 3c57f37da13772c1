"""Does the demo still learn with asynchronous rollouts? Held-out accuracy curves, sync vs max_staleness=1.

    flock /work/bench.lock .venv/bin/python -m benchmarks.async_learning [--seeds 0 1] [--steps 30]

Each variant is configs/demo.yaml (two rollout workers, 30 steps, held-out greedy pass@1 every
3 steps) in a fresh child process; seeds and variants alternated. Variants: the synchronous demo
as shipped (learning rate 2e-3), max_staleness=1 at that rate, and max_staleness=1 at 1e-3.
Writes benchmarks/results/async_learning.{json,md}.
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

from benchmarks.common import DEFAULT_OUT, child_main, demo_settings, machine_info, rotated, run_child  # noqa: E402

VARIANTS: dict[str, list[str]] = {
    "sync, lr 2e-3 (the demo)": ["max_staleness=0"],
    "max_staleness=1, lr 2e-3": ["max_staleness=1"],
    "max_staleness=1, lr 1e-3": ["max_staleness=1", "learner.learning_rate=1.0e-3"],
}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Child side: one demo run; the held-out accuracy after every evaluated step, and the wall time."""
    from cluster.config import load_config
    from cluster.driver import run

    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [
            f"run_root={spec['tmp_dir']}",
            "name=learning",
            f"seed={spec['seed']}",
            f"steps={spec['steps']}",
            "eval_every=3",
            "logging.progress_bar=false",
            *VARIANTS[spec["variant"]],
        ],
    )
    result = run(cfg, echo=lambda *a: print(*a, flush=True))
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines() if line]
    curve = {int(r["step"]): float(r["eval/accuracy"]) for r in rows if "eval/accuracy" in r}
    staleness = [float(r["async/staleness_mean"]) for r in rows if "async/staleness_mean" in r]
    return {
        "curve": curve,
        "seconds": result.seconds,
        "staleness_mean": sum(staleness) / max(1, len(staleness)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    settings = demo_settings(args.out, len(args.seeds), args.steps)
    runs: dict[str, dict[int, Any]] = {v: {} for v in VARIANTS}
    for r, seed in enumerate(args.seeds):
        for variant in rotated(list(VARIANTS), r):
            spec = {"kind": "measure", "variant": variant, "seed": seed, "steps": args.steps}
            runs[variant][seed] = run_child("async_learning", spec, settings, f"learning_{r}_{seed}")
            print(variant, seed, json.dumps(runs[variant][seed]["curve"]), flush=True)
    out = {"steps": args.steps, "seeds": args.seeds, "runs": runs, "machine": machine_info()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "async_learning.json").write_text(json.dumps(out, indent=1))
    lines = [
        "# The demo's held-out accuracy, synchronous vs max_staleness=1",
        "",
        f"`python -m benchmarks.async_learning --seeds {' '.join(map(str, args.seeds))} --steps {args.steps}`: "
        "configs/demo.yaml, greedy pass@1 on the held-out set every 3 steps.",
        "",
    ]
    steps = sorted({int(s) for v in runs.values() for run in v.values() for s in run["curve"]})
    lines += ["| variant | seed | " + " | ".join(f"step {s}" for s in steps) + " | gain | mean staleness |"]
    lines += ["|---|---|" + "---|" * len(steps) + "---|---|"]
    for variant, by_seed in runs.items():
        for seed, run in by_seed.items():
            curve = {int(k): v for k, v in run["curve"].items()}
            gain = 100 * (curve[max(curve)] - curve[0])
            cells = " | ".join(f"{curve[s]:.2f}" if s in curve else "–" for s in steps)
            lines.append(
                f"| {variant} | {seed} | {cells} | {gain:+.0f} points | {run['staleness_mean']:.2f} |"
            )
    (args.out / "async_learning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if "--spec" in sys.argv:
        child_main({"measure": measure})
    else:
        main()
