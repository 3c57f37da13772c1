"""Wall time a demo run loses to one SIGKILLed rollout worker and to one SIGKILLed learner.

    flock /work/bench.lock .venv/bin/python -m benchmarks.fault_cost [--steps 10] [--repeats 2]

Three sides, alternated (A B C / B C A ...), each a fresh child process running configs/demo.yaml
(two rollout workers, eval off, checkpoint_every=2) for `--steps` steps:
  fixed    uninterrupted
  worker   rollout worker 0's process SIGKILLed as soon as step 3 is logged (step 4 is generating)
  learner  the learner's process SIGKILLed as soon as checkpoint step 4 is complete (step 5 then
           finds it dead: restart, restore step 4, redo step 5)
The figure is the step loop's wall time (from step 1 logged to the last step logged, which leaves
the 20-40 s actor start-up and its noise out) minus the fixed run's of the same round. Processes
are found through Ray (named actors), never by name. Writes benchmarks/results/fault_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    DEFAULT_OUT,
    child_main,
    demo_settings,
    fmt_range,
    machine_info,
    rotated,
    run_child,
    summary,
)

SIDES = ("fixed", "worker", "learner")


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Child side: one demo run with (or without) a kill; the wall time at which each step was logged."""
    from cluster.config import load_config
    from cluster.driver import run

    name = f"fault-{spec['side']}"
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [
            f"steps={spec['steps']}",
            "checkpoint_every=2",
            "data.eval_files=[]",
            "logging.progress_bar=false",
            f"run_root={spec['tmp_dir']}",
            f"name={name}",
        ],
    )
    logged: dict[int, float] = {}
    events: dict[str, float] = {}
    stop = threading.Event()

    def watch() -> None:  # when each step first appears in metrics.jsonl; the kill
        path = cfg.run_dir / "metrics.jsonl"
        pid = None
        while not stop.is_set():
            if pid is None and spec["side"] != "fixed":
                pid = _pid(name, ".rollout-0.0" if spec["side"] == "worker" else ".learner")
            for row in _rows(path):
                if "train/loss" in row:
                    logged.setdefault(row["step"], time.perf_counter())
            ready = (
                3 in logged
                if spec["side"] == "worker"
                else (cfg.run_dir / "checkpoints" / "step_000004" / "state.json").exists()
            )
            if pid is not None and ready and "kill" not in events:
                os.kill(pid, signal.SIGKILL)
                events["kill"] = time.perf_counter()
            time.sleep(0.005)

    def echo(line: str) -> None:
        print(line, flush=True)
        if line.startswith(("rollout worker 0 joined", "learner restarted")):
            events.setdefault("recovered", time.perf_counter())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    run(cfg, echo=echo)
    stop.set()
    watcher.join(timeout=10)
    for row in _rows(cfg.run_dir / "metrics.jsonl"):  # steps logged between the last poll and the end
        if "train/loss" in row:
            logged.setdefault(row["step"], time.perf_counter())
    restarts = sum(r.get("pool/restarts", 0) for r in _rows(cfg.run_dir / "metrics.jsonl"))
    return {
        "loop_s": logged[spec["steps"]] - logged[1],
        "kill_to_recovered_s": events["recovered"] - events["kill"] if "recovered" in events else None,
        "pool_restarts": restarts,
        "killed": "kill" in events,
    }


def _pid(run_name: str, suffix: str) -> int | None:
    import ray

    if not ray.is_initialized():
        return None
    names = [n for n in ray.util.list_named_actors() if n.startswith(f"{run_name}.") and n.endswith(suffix)]
    if not names:
        return None
    actor = ray.get_actor(names[0])
    pid: Any = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    return int(pid)


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    settings = demo_settings(args.out, args.repeats, args.steps)
    machine = machine_info()
    rounds: list[dict[str, Any]] = []
    for r in range(args.repeats):
        results = {}
        for side in rotated(SIDES, r):
            results[side] = run_child(
                "fault_cost",
                {"kind": "measure", "side": side, "steps": args.steps},
                settings,
                f"fault_{side}_{r}",
            )
            print(side, r, json.dumps(results[side]), flush=True)
        rounds.append(results)
    lost = {
        side: summary([rd[side]["loop_s"] - rd["fixed"]["loop_s"] for rd in rounds]) for side in SIDES[1:]
    }
    recovered: dict[str, Any] = {}
    for side in SIDES[1:]:
        seen = [
            rd[side]["kill_to_recovered_s"] for rd in rounds if rd[side]["kill_to_recovered_s"] is not None
        ]
        recovered[side] = summary(seen) if seen else None  # None: the restarted worker joined after the run
    loop = {side: summary([rd[side]["loop_s"] for rd in rounds]) for side in SIDES}
    out = {
        "steps": args.steps,
        "rounds": rounds,
        "lost_s": lost,
        "kill_to_recovered_s": recovered,
        "loop_s": loop,
    }
    out["machine"] = machine
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fault_cost.json").write_text(json.dumps(out, indent=1))
    md = [
        "# Wall time lost to a killed rollout worker / learner (demo, 2 workers)",
        "",
        f"`python -m benchmarks.fault_cost --steps {args.steps} --repeats {args.repeats}`; configs/demo.yaml, "
        "eval off, checkpoint_every=2; medians (min–max) over rounds, sides alternated. Load average at start "
        f"{machine['load_average'][0]:.1f} on {machine['cores']} cores: other engineers' tests ran at the same time.",
        "",
        "| | step loop (s) | lost vs fixed (s) | kill -> recovered (s) |",
        "|---|---|---|---|",
        f"| fixed | {fmt_range(loop['fixed'], 1)} | – | – |",
        f"| rollout worker SIGKILL at step 4 | {fmt_range(loop['worker'], 1)} | {fmt_range(lost['worker'], 1)} "
        f"| {fmt_range(recovered['worker'], 1)} (restarted engine joined) |",
        f"| learner SIGKILL after checkpoint 4 | {fmt_range(loop['learner'], 1)} | {fmt_range(lost['learner'], 1)} "
        f"| {fmt_range(recovered['learner'], 1)} (learner restored, workers re-synced) |",
        "",
    ]
    (args.out / "fault_cost.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    if "--spec" in sys.argv:
        child_main({"measure": measure})
    else:
        main()
