"""Policy-sync cost: seconds and bytes per sync, `merged` vs `adapter` vs `worker_merge`, 1 and 2 workers.

Benchmark model: real `grpo-ray train` runs of the workload (benchmarks/e2e.py's grpo-ray child) in
each (mode, workers) cell; per timed step, time/sync as logged by the driver (export on the learner,
the object-store hop, every worker's checksum + in-place load, the acks) and its share of that
step's wall time (1 warm-up + 3 timed steps per run). The (merged, 2 workers) cell reuses e2e's NF4
runs (5 timed steps).

0.5B Qwen2.5-shaped model (full mode, when memory allows): one training step takes tens of minutes
on this CPU, so the parts are measured on the real components instead of a whole run: the learner
(cluster.placement.start_learner_group) and two RolloutWorkers per mode; the driver's own `_sync` repeated with one and with both
workers; one `pool.generate` of the workload per (mode, workers); and the learner's `train_step`
on 2 of the step's 16 micro-batches of 8, scaled to 16 (forward/backward cost is the same for every
micro-batch of equal-length rows; the rest of train_step is small next to it). The share is
sync / (generate + train + sync) for that cell.

Side by side (`side_by_side`): the same parts measurement on the 22.9M bench model, all three modes
in one run; merged and worker_merge alternate, sync by sync and generate by generate, on the same
engines (both reload plain merged weights), so their decode tokens/s are compared within one run.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks import e2e
from benchmarks.common import (
    WORKLOAD,
    ChildFailed,
    Settings,
    available_gib,
    bench_config,
    child_main,
    fmt_range,
    goal_check,
    local_ray,
    rotated,
    run_child,
    summary,
    train_prompts,
)
from grpo_ray.seeds import prompt_seeds

GOAL = 0.02  # sync seconds / step seconds
CELLS = [
    ("merged", 1),
    ("merged", 2),
    ("adapter", 1),
    ("adapter", 2),
    ("worker_merge", 1),
    ("worker_merge", 2),
]
SYNC_TIMED_STEPS = 3  # per run of a cell: every step gives a sync and a step time, 3 are plenty
BIG_MIN_FREE_GIB = 14.0  # learner (~9 GiB while training on the 152k vocabulary) or 2 engines + payloads
BIG_MICRO_BATCH = 8
# float32 like the workload first; two float32 engines (~4.5 GB each) + the learner's export may not
# fit next to other jobs in 24 GB, so bfloat16 engines (half the memory and payload) are the fallback.
BIG_ROLLOUT_DTYPES = ("float32", "bfloat16")
BIG_TRAINED_MICRO_BATCHES = 2


def run(settings: Settings, e2e_section: dict[str, Any] | None) -> dict[str, Any]:
    reused = _reusable_runs(e2e_section)
    cells = [("adapter", 2)] if settings.quick else CELLS
    runs: dict[str, list[dict[str, Any]]] = {_key(m, n): [] for m, n in cells}
    if reused:
        runs[_key("merged", 2)] = reused
    todo = [c for c in cells if not runs[_key(*c)]]
    for r in range(settings.repeats):
        for mode, workers in rotated(todo, r):
            spec = e2e.grpo_ray_spec(settings, "nf4", sync=mode, workers=workers)
            spec["timed"] = min(spec["timed"], SYNC_TIMED_STEPS)
            runs[_key(mode, workers)].append(run_child("e2e", spec, settings, f"sync-{mode}-{workers}w-{r}"))
    section: dict[str, Any] = {"goal": GOAL, "bench_model": {k: _cell(v) for k, v in runs.items() if v}}
    section["big_model"] = _big(settings)
    section["side_by_side"] = side_by_side(settings)
    return section


def side_by_side(settings: Settings) -> dict[str, Any]:
    """merged / adapter / worker_merge measured part by part in one run on the 22.9M bench model
    (big_child), merged and worker_merge alternating on the same engines."""
    if settings.quick:  # two more engine starts and a train step: kept out of the smoke run
        return {"skipped": "off with --quick"}
    spec = {
        "kind": "big",
        "model": str(settings.model),
        "cores": settings.cores,
        "syncs": max(5, settings.repeats),
        "rollout_dtype": "float32",
        "generate_rounds": 3,
    }
    try:
        return run_child("sync_cost", spec, settings, "sync-side-by-side")
    except ChildFailed as err:
        return {"error": str(err)}


def _key(mode: str, workers: int) -> str:
    return f"{mode}/{workers}w"


def _reusable_runs(e2e_section: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not e2e_section or "nf4" not in e2e_section.get("variants", {}):
        return []
    return list(e2e_section["variants"]["nf4"]["runs"]["grpo-ray"])


def _cell(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def per_run(field: str) -> list[float]:
        return [sum(s[field] for s in r["steps"]) / len(r["steps"]) for r in runs]

    return {
        "sync_s": summary(per_run("sync_s")),
        "worker_load_s": summary(per_run("worker_load_s")),
        "step_s": summary([r["s_per_step"] for r in runs]),
        "generate_s": summary(per_run("generate_s")),
        "share": summary([r["sync_share"] for r in runs]),
        "bytes": summary([r["sync_bytes"] for r in runs]),
        "first_sync_s": summary([r["first_sync_s"] for r in runs]),
        "first_sync_bytes": summary([r["first_sync_bytes"] for r in runs]),
    }


def _big(settings: Settings) -> dict[str, Any]:
    if settings.quick or not settings.big:
        return {"skipped": "off (--quick or --big off)"}
    if not (settings.big_model / "config.json").exists():
        return {
            "skipped": f"{settings.big_model} not built (scripts/build_bench_model.py --shape qwen2.5-0.5b)"
        }
    free = available_gib()
    if free < BIG_MIN_FREE_GIB:
        return {"skipped": f"only {free:.1f} GiB memory available, {BIG_MIN_FREE_GIB:.0f} needed"}
    failures: dict[str, str] = {}
    for dtype in BIG_ROLLOUT_DTYPES:
        spec = {
            "kind": "big",
            "model": str(settings.big_model),
            "cores": settings.cores,
            "syncs": max(3, settings.repeats),
            "rollout_dtype": dtype,
        }
        try:
            return {**run_child("sync_cost", spec, settings, f"sync-0.5b-{dtype}"), "failed_before": failures}
        except ChildFailed as err:  # e.g. Ray's memory monitor on a shared machine: try smaller engines
            failures[dtype] = str(err)
    return {"error": "\n".join(failures.values()), "failed_before": failures}


# ---- the 0.5B model (a child process) ------------------------------------------------------------


# Engines of one kind serve the modes of a group: merged and worker_merge both reload plain merged
# weights into engines without vLLM LoRA, so they alternate on the same engines, sync by sync and
# generate by generate; adapter mode needs LoRA-enabled engines of its own.
ENGINE_GROUPS = (("merged", "worker_merge"), ("adapter",))
MODES = tuple(mode for group in ENGINE_GROUPS for mode in group)


def big_child(spec: dict[str, Any]) -> dict[str, Any]:
    """The parts of a step on the real components, per (mode, workers): sync, generate, one train step.

    spec: model, cores, syncs (timed syncs per cell), rollout_dtype, generate_rounds (generates per
    cell, alternated between the modes of an engine group).
    """
    import ray
    from transformers import AutoTokenizer

    import cluster.policy_sync as policy_sync
    from cluster.placement import bundle_nodes, start_learner_group, start_workers
    from cluster.rollout_pool import RolloutPool
    from grpo_ray.records import Batch

    model, cores, syncs, w = spec["model"], spec["cores"], spec["syncs"], WORKLOAD
    rounds = int(spec.get("generate_rounds", 1))

    def config(mode: str, check_every: int = 0) -> Any:
        extra = [
            f"learner.micro_batch_size={BIG_MICRO_BATCH}",
            "rollout.kv_cache_mb=320",
            f"rollout.dtype={spec['rollout_dtype']}",
            # The learner does not train between these syncs (its version stays 0, which every
            # check period divides): no full check, except in the one cell that measures it.
            f"sync_check_every={check_every}",
        ]
        return bench_config(model, steps=1, run_root=spec["tmp_dir"], sync=mode, cores=cores, extra=extra)

    tokenizer = AutoTokenizer.from_pretrained(model)
    pad_id = tokenizer.pad_token_id
    prompts = train_prompts(model, w.prompts_per_step)
    out: dict[str, Any] = {
        "parameters": _parameters(model),
        "rollout_dtype": spec["rollout_dtype"],
        "cells": {},
    }
    groups: list[Any] = []
    with local_ray():
        learner = start_learner_group(config("merged"), model, pad_id)
        learner.weight_names({})  # waits until the learner has loaded (peaks do not overlap the engines')
        for modes in ENGINE_GROUPS:
            workers, group = start_workers(config(modes[0]), model)  # adapter: vLLM LoRA enabled
            packed = ray.get([worker.packed_modules.remote() for worker in workers])[0]  # all started
            pool = RolloutPool(workers, bundle_nodes(group))
            learner.weight_names(packed)
            memory = {"started": _private_gib(workers)}
            first_sync_s = {}
            for mode in modes:  # worker_merge last: its base sync leaves the workers holding the base
                begin = time.perf_counter()
                policy_sync.sync(config(mode), learner, pool, include_base=True)
                first_sync_s[mode] = time.perf_counter() - begin
            memory["after_first_sync"] = _private_gib(workers)
            for n in (2, 1):
                part = RolloutPool(workers[:n], pool.nodes[:n])
                seconds: dict[str, list[float]] = {m: [] for m in modes}
                loads: dict[str, list[float]] = {m: [] for m in modes}
                for r in range(syncs):
                    for mode in rotated(list(modes), r):
                        begin = time.perf_counter()
                        _, acks = policy_sync.sync(config(mode), learner, part, include_base=False)
                        seconds[mode].append(time.perf_counter() - begin)
                        loads[mode].append(max(a.seconds for a in acks))
                generate_s: dict[str, list[float]] = {m: [] for m in modes}
                tokens_per_s: dict[str, list[float]] = {m: [] for m in modes}
                for r in range(rounds):
                    for mode in rotated(list(modes), r):
                        policy_sync.sync(
                            config(mode), learner, part, include_base=False
                        )  # engines run this mode
                        seed_cfg = config(mode)
                        begin = time.perf_counter()
                        generated = part.generate(
                            prompts,
                            w.group_size,
                            seeds=prompt_seeds(
                                seed_cfg.seed, 1, seed_cfg.prompts_per_step, seed_cfg.group_size
                            ),
                        )
                        elapsed = time.perf_counter() - begin
                        groups = groups or generated
                        tokens = sum(len(c.token_ids) for g in generated for c in g.completions)
                        generate_s[mode].append(elapsed)
                        tokens_per_s[mode].append(tokens / elapsed)
                for mode in modes:
                    out["cells"][_key(mode, n)] = {
                        "sync_s": summary(seconds[mode]),
                        "worker_load_s": summary(loads[mode]),
                        "generate_s": summary(generate_s[mode])["median"],
                        "decode_tokens_per_s": summary(tokens_per_s[mode]),
                        "first_sync_s": first_sync_s[mode],
                    }
                if "worker_merge" in modes:  # one sync with the full check, to price it
                    begin = time.perf_counter()
                    _, acks = policy_sync.sync(
                        config("worker_merge", check_every=1), learner, part, include_base=False
                    )
                    out["cells"][_key("worker_merge", n)]["checked_sync_s"] = time.perf_counter() - begin
                    assert all(a.merged_checksum for a in acks), "a checked sync reports the rebuilt checksum"
            memory["after_all_syncs"] = _private_gib(workers)
            out["engine_private_gib_" + "+".join(modes)] = memory
            _stop(workers, group)  # the next engines, the payload sizes and training need the memory
            for mode in modes:  # bytes do not depend on the workers; read them with no engine holding memory
                for n in (2, 1):
                    cfg = config(mode)
                    out["cells"][_key(mode, n)]["bytes"] = e2e.update_bytes(cfg, learner, include_base=False)
                    out["cells"][_key(mode, n)]["first_sync_bytes"] = e2e.update_bytes(
                        cfg, learner, include_base=True
                    )
        count = BIG_TRAINED_MICRO_BATCHES * BIG_MICRO_BATCH // w.group_size
        batch = Batch(groups[:count], [[0.0, 1.0] * (w.group_size // 2)] * count, w.max_new_tokens)
        begin = time.perf_counter()
        learner.train_step(batch)
        measured = time.perf_counter() - begin
        learner.stop()
    train_s = measured * (w.sequences // BIG_MICRO_BATCH) / BIG_TRAINED_MICRO_BATCHES
    out["train_s_estimated"] = train_s
    out["train_s_measured"] = {"seconds": measured, "micro_batches": BIG_TRAINED_MICRO_BATCHES}
    for cell in out["cells"].values():
        step = cell["generate_s"] + train_s + cell["sync_s"]["median"]
        cell["step_s_estimated"] = step
        cell["share"] = cell["sync_s"]["median"] / step
    return out


def _private_gib(workers: list[Any]) -> float:
    """Largest private memory (USS) of the engines' processes, in GiB (they run on this machine)."""
    import os

    import psutil
    import ray

    pids = ray.get([w.__ray_call__.remote(lambda _self: os.getpid()) for w in workers])
    return max(psutil.Process(pid).memory_full_info().uss for pid in pids) / 2**30


def _stop(workers: list[Any], group: Any) -> None:
    import ray
    from ray.util.placement_group import remove_placement_group

    for worker in workers:
        ray.kill(worker)
    remove_placement_group(group)  # its CPUs go back to the pool for the next engines


def _parameters(model: str) -> int:
    import json
    from pathlib import Path

    meta = Path(model) / "bench_model.json"
    return int(json.loads(meta.read_text())["parameters"]) if meta.exists() else 0


# ---- markdown ------------------------------------------------------------------------------------


def markdown(section: dict[str, Any]) -> list[str]:
    goal = section["goal"]
    lines = [
        "## 3. Sync cost (merged vs adapter vs worker_merge, 1 and 2 rollout workers)",
        "",
        f"Goal: <= {goal:.0%} of step time. Per timed step: the driver's time/sync (learner export, object "
        "store, every worker's checksum + load, acks); 'worker load' is the slowest worker's part.",
        "",
        "| model | mode / workers | MB per sync | s per sync | worker load s | step s | share | goal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, cell in section["bench_model"].items():
        lines.append(
            f"| 22.9M bench | {key} | {cell['bytes']['median'] / 1e6:.1f} | {fmt_range(cell['sync_s'], 3)} | "
            f"{fmt_range(cell['worker_load_s'], 3)} | {fmt_range(cell['step_s'], 1)} | "
            f"{fmt_range(cell['share'], 2, scale=100, unit='%')} | {goal_check(cell['share']['median'], goal, False)} |"
        )
    big = section["big_model"]
    if "skipped" in big or "error" in big:
        why = big.get("skipped") or "failed: " + big["error"].splitlines()[0]
        lines.append(f"| 0.5B | {why} | | | | | | |")
    else:
        for key, cell in big["cells"].items():
            lines.append(
                f"| 0.5B, {big['rollout_dtype']} engines (est. step) | {key} | {cell['bytes'] / 1e6:.1f} | {fmt_range(cell['sync_s'], 2)} | "
                f"{fmt_range(cell['worker_load_s'], 2)} | {cell['step_s_estimated']:.0f} | "
                f"{cell['share'] * 100:.2f}% | {goal_check(cell['share'], goal, False)} |"
            )
        lines += ["", _parts_note(big)]
    lines += [
        "",
        "First sync of a run (the base: dequantized, or packed NF4 for worker_merge; + adapter; before step 1, not in any step):",
        "",
    ]
    lines += ["| model | mode / workers | MB | s |", "|---|---|---|---|"]
    for key, cell in section["bench_model"].items():
        lines.append(
            f"| 22.9M bench | {key} | {cell['first_sync_bytes']['median'] / 1e6:.1f} | "
            f"{fmt_range(cell['first_sync_s'], 2)} |"
        )
    if "cells" in big:
        for key, cell in big["cells"].items():
            lines.append(
                f"| 0.5B | {key} | {cell['first_sync_bytes'] / 1e6:.1f} | {cell['first_sync_s']:.1f} |"
            )
    return lines + side_by_side_markdown(section.get("side_by_side"), goal) + computed_markdown()


def computed_markdown() -> list[str]:
    """Bytes per sync for the shipped 7B cluster config in each mode: arithmetic, not a run
    (cluster/planning/sync_bytes.py, which tests/integration/test_worker_merge.py checks against the
    learner's real exports)."""
    from cluster.config import load_config
    from cluster.planning.memory import builtin_shape
    from cluster.planning.sync_bytes import sync_bytes

    cfg = load_config("gsm8k_qwen2.5-7b_cluster")
    shape = builtin_shape(cfg.model)
    assert shape is not None, "the 7B config names a built-in Qwen2.5 shape"
    workers = cfg.rollout.num_workers
    lines = [
        "",
        f"### Computed, not run: {cfg.model}, configs/gsm8k_qwen2.5-7b_cluster.yaml "
        f"(LoRA r={cfg.learner.lora.rank} {cfg.learner.lora.target_modules}, {cfg.rollout.dtype} engines, "
        f"{workers} rollout workers)",
        "",
        "One object-store copy per sync; each rollout node fetches it, so a step moves it to every node.",
        "",
        f"| mode | GB per sync | % of merged | GB per step to {workers} workers | first sync GB |",
        "|---|---|---|---|---|",
    ]
    merged = sync_bytes(cfg, shape, "merged").per_step
    for mode in ("merged", "adapter", "worker_merge"):
        b = sync_bytes(cfg, shape, mode)
        lines.append(
            f"| {mode} | {b.per_step / 1e9:.3f} | {100 * b.per_step / merged:.1f}% | "
            f"{workers * b.per_step / 1e9:.2f} | {b.first / 1e9:.2f} |"
        )
    return lines


def side_by_side_markdown(parts: dict[str, Any] | None, goal: float) -> list[str]:
    """The merged / adapter / worker_merge table of one big_child run."""
    if not parts:
        return []
    lines = ["", "### merged vs adapter vs worker_merge, side by side (22.9M bench model, one run)", ""]
    if "error" in parts or "skipped" in parts:
        return [*lines, parts.get("skipped") or f"failed: {parts['error'].splitlines()[0]}"]
    cells = parts["cells"]
    lines += [
        "Parts of a step on the real components (learner + 2 RolloutWorkers per engine kind): merged and "
        "worker_merge alternate sync by sync and generate by generate on the same engines; adapter runs "
        "on LoRA-enabled engines. Step = generate + train_step (estimated) + sync.",
        "",
        "| mode / workers | MB per sync | % of merged | s per sync | worker load s | est. step s | share | "
        "goal | decode tok/s | vs merged | first sync MB | first sync s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, cell in cells.items():
        n = key.split("/")[1]
        merged = cells[f"merged/{n}"]
        tps, base = cell["decode_tokens_per_s"]["median"], merged["decode_tokens_per_s"]["median"]
        lines.append(
            f"| {key} | {cell['bytes'] / 1e6:.2f} | {100 * cell['bytes'] / merged['bytes']:.1f}% | "
            f"{fmt_range(cell['sync_s'], 3)} | {fmt_range(cell['worker_load_s'], 3)} | "
            f"{cell['step_s_estimated']:.1f} | {cell['share'] * 100:.2f}% | {goal_check(cell['share'], goal, False)} | "
            f"{fmt_range(cell['decode_tokens_per_s'], 0)} | {tps / base:.2f}x | "
            f"{cell['first_sync_bytes'] / 1e6:.1f} | {cell['first_sync_s']:.2f} |"
        )
    checked = ", ".join(f"{k} {c['checked_sync_s']:.3f} s" for k, c in cells.items() if "checked_sync_s" in c)
    lines += ["", _parts_note(parts) + f" A worker_merge sync with the full check: {checked}."]
    return lines


def _parts_note(big: dict[str, Any]) -> str:
    return (
        f"Step estimate = generate (measured per cell) + train_step "
        f"({big['train_s_estimated']:.0f} s: {big['train_s_measured']['seconds']:.1f} s measured on "
        f"{big['train_s_measured']['micro_batches']} of 16 micro-batches of {BIG_MICRO_BATCH}, scaled) + sync. "
        "Generate per cell: "
        + ", ".join(f"{k} {c['generate_s']:.1f} s" for k, c in big["cells"].items())
        + ". Largest engine private memory (GiB) at start / after the first sync / after all syncs: "
        + "; ".join(
            f"{key.removeprefix('engine_private_gib_')} {m['started']:.1f} / {m['after_first_sync']:.1f} / "
            f"{m['after_all_syncs']:.1f}"
            for key, m in big.items()
            if key.startswith("engine_private_gib_")
        )
        + "."
    )


if __name__ == "__main__":
    child_main({"big": big_child})
