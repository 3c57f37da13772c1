"""Run every benchmark; write benchmarks/results/results.json and results.md.

    scripts/bench.sh                             # full: 3 repeats x (1 warm-up + 5 timed steps), TRL, 0.5B sync
    scripts/bench.sh --quick                     # smoke run of every path but TRL's: 1 timed step, 1 repeat

The fixed workload (benchmarks/common.py `Workload`): the demo's arithmetic prompts, 16 prompts x 8
completions of 64 tokens at temperature 1 per step, LoRA r=16 on all linear layers over an NF4 base
(and plain LoRA), float32 on CPU, on a 22.9M-parameter random Qwen2 built by
scripts/build_bench_model.py (built here on first use). Sections:

1. e2e                 grpo-ray vs TRL GRPOTrainer, tokens/s and s/step        (goal >= 2.0x)
2. rollout_overhead    RolloutWorker vs bare vLLM LLM.generate in a Ray actor   (goal >= 0.95x)
3. sync_cost           merged / adapter / worker_merge sync, 1 and 2 workers, 22.9M and 0.5B (<= 2% of a step)
4. learner_efficiency  Learner.train_step vs plain PEFT forward + backward      (goal >= 0.9x)
5. breakdown           grpo-ray's step split: generate / reward / train / sync / idle (from the e2e runs)
6. limits              each phase's useful FLOPs vs this machine's measured float32 GEMM rate
7. chunked_logprobs    train_step peak memory unchunked vs chunked logprobs (152k vocab), speed, planner

`--only SECTION ...` re-measures those sections and keeps the others of an existing OUT/results.json.

Figures are medians over repeats with min and max; compared sides alternate. Each measurement runs in
its own process; their logs go to OUT/logs/. A failed section is recorded under "errors" and the run
goes on (exit status 1 at the end).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks import (  # noqa: E402
    chunked_logprobs,
    e2e,
    learner_efficiency,
    limits,
    rollout_overhead,
    sync_cost,
    trl_baseline,
)
from benchmarks.common import (  # noqa: E402
    BENCH_MODEL,
    BIG_MODEL,
    DEFAULT_OUT,
    WORKLOAD,
    ChildFailed,
    Settings,
    all_finite,
    fmt_range,
    goal_check,
    machine_cores,
    machine_info,
)

SECTIONS = ("e2e", "rollout_overhead", "sync_cost", "learner_efficiency", "limits", "chunked_logprobs")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 timed step, 1 repeat, no TRL, no 0.5B model")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output directory (default benchmarks/results)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs per figure (default 3; 1 with --quick)"
    )
    parser.add_argument(
        "--timed-steps", type=int, default=None, help="timed steps per run (default 5; 1 with --quick)"
    )
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument(
        "--trl", choices=("auto", "on", "off"), default="auto", help="auto: on if installed, off with --quick"
    )
    parser.add_argument(
        "--big",
        choices=("auto", "on", "off"),
        default="auto",
        help="the 0.5B sync benchmark; auto: off with --quick",
    )
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument(
        "--render",
        action="store_true",
        help="measure nothing: rewrite results.md from results.json and the separate benchmarks' .md files",
    )
    parser.add_argument("--model", type=Path, default=BENCH_MODEL)
    parser.add_argument(
        "--child-timeout", type=float, default=3600.0, help="seconds before a measurement is killed"
    )
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    trl = args.trl == "on" or (args.trl == "auto" and not args.quick and trl_baseline.available())
    return Settings(
        quick=args.quick,
        repeats=args.repeats or (1 if args.quick else 3),
        warmup_steps=args.warmup_steps,
        timed_steps=args.timed_steps or (1 if args.quick else 5),
        out_dir=args.out,
        log_dir=args.out / "logs",
        model=args.model.resolve(),
        big_model=BIG_MODEL,
        trl=trl,
        big=args.big == "on" or (args.big == "auto" and not args.quick),
        child_timeout_s=args.child_timeout,
        cores=machine_cores(),
    )


def ensure_model(path: Path, shape: str) -> None:
    if (path / "config.json").exists():
        return
    script = ROOT / "scripts" / "build_bench_model.py"
    print(f"building the {shape} benchmark model in {path}", flush=True)
    subprocess.run([sys.executable, str(script), "--out", str(path), "--shape", shape], check=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    if args.render:
        write(json.loads((settings.out_dir / "results.json").read_text()), settings.out_dir)
        return 0
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    ensure_model(settings.model, "bench")
    if settings.big and "sync_cost" in args.only:
        ensure_model(settings.big_model, "qwen2.5-0.5b")
    if "chunked_logprobs" in args.only:
        ensure_model(chunked_logprobs.VOCAB_MODEL, "bench-vocab152k")
    start = time.perf_counter()
    results: dict[str, Any] = {
        "settings": settings.to_json(),
        "workload": asdict(WORKLOAD),
        "machine_start": machine_info(),
        "sections": {},
        "errors": {},
    }
    previous = settings.out_dir / "results.json"
    if set(args.only) != set(SECTIONS) and previous.exists():
        # A partial re-run: the sections not asked for stay as they were measured.
        kept = json.loads(previous.read_text())
        results["sections"] = {k: v for k, v in kept["sections"].items() if k not in args.only}
        results["errors"] = {k: v for k, v in kept["errors"].items() if k not in args.only}
        results["settings"], results["machine_start"] = kept["settings"], kept["machine_start"]
    for name in args.only:
        print(f"== {name}", flush=True)
        begin = time.perf_counter()
        try:
            if name == "e2e":
                section = e2e.run(settings)
            elif name == "rollout_overhead":
                section = rollout_overhead.run(settings)
            elif name == "sync_cost":
                section = sync_cost.run(settings, results["sections"].get("e2e"))
            elif name == "limits":
                section = limits.run(settings, results["sections"].get("e2e"))
            elif name == "chunked_logprobs":
                section = chunked_logprobs.run(settings)
            else:
                section = learner_efficiency.run(settings)
        except ChildFailed as err:
            results["errors"][name] = str(err)
            print(f"{name} failed:\n{err}", file=sys.stderr, flush=True)
            continue
        section["seconds"] = time.perf_counter() - begin
        results["sections"][name] = section
        if name == "e2e":
            results["sections"]["breakdown"] = breakdown(section)
        print(f"   {name}: {section['seconds']:.0f} s", flush=True)
        write(results, settings.out_dir)  # a long run leaves what it has measured so far
    results["machine_end"] = machine_info()
    results["seconds"] = time.perf_counter() - start
    if not all_finite(results["sections"]):
        results["errors"]["non_finite"] = "a section holds a NaN or infinite number"
    write(results, settings.out_dir)
    print(
        f"wrote {settings.out_dir / 'results.json'} and results.md in {results['seconds']:.0f} s", flush=True
    )
    return 1 if results["errors"] else 0


def breakdown(e2e_section: dict[str, Any]) -> dict[str, Any]:
    """Section 5: grpo-ray's per-step split, from the e2e runs."""
    return {
        quantization: {"s_per_step": v["grpo-ray"]["s_per_step"], **v["grpo-ray"]["breakdown_s"]}
        for quantization, v in e2e_section["variants"].items()
    }


# Benchmarks with their own command and result file, shown at the end of results.md as they last ran.
SEPARATE = ("async_overlap", "async_learning", "time_to_accuracy", "fault_cost")


def write(results: dict[str, Any], out_dir: Path) -> None:
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = render(results)
    for name in SEPARATE:
        path = out_dir / f"{name}.md"
        if path.exists():  # their headings move one level down, under this file's title
            lines += [
                "",
                *(f"#{line}" if line.startswith("#") else line for line in path.read_text().splitlines()),
            ]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")


def render(results: dict[str, Any]) -> list[str]:
    s, m = results["settings"], results["machine_start"]
    sections = results["sections"]
    w = results["workload"]
    mode = "quick" if s["quick"] else "full"
    lines = [
        "# grpo-ray benchmarks",
        "",
        f"Mode {mode}: {s['repeats']} repeat(s) x ({s['warmup_steps']} warm-up + {s['timed_steps']} timed steps). "
        f"Workload: {w['prompts_per_step']} prompts x {w['group_size']} completions x {w['max_new_tokens']} new "
        f"tokens per step, LoRA r={w['lora_rank']} all-linear, micro-batch {w['micro_batch_size']}, float32, "
        f"22.9M-parameter random Qwen2 (scripts/build_bench_model.py). Machine: {m['cores']} cores, "
        f"{m['memory_gib']} GiB, load average at start {m['load_average'][0]:.1f}"
        + (f", at end {results['machine_end']['load_average'][0]:.1f}" if "machine_end" in results else "")
        + (f"; total {results['seconds'] / 60:.0f} min." if "seconds" in results else "."),
        "",
        "Figures: median (min–max) over repeats; compared sides ran alternately.",
        "",
        "## Goals",
        "",
        "| benchmark | result | goal | status |",
        "|---|---|---|---|",
    ]
    lines += _goal_rows(sections)
    if results["errors"]:
        lines += ["", "## Errors", ""]
        lines += [f"- {name}: {err.splitlines()[0]}" for name, err in results["errors"].items()]
    renderers = [
        ("e2e", e2e.markdown),
        ("rollout_overhead", rollout_overhead.markdown),
        ("sync_cost", sync_cost.markdown),
        ("learner_efficiency", learner_efficiency.markdown),
        ("e2e", e2e.breakdown_markdown),
        ("limits", limits.markdown),
        ("chunked_logprobs", chunked_logprobs.markdown),
    ]
    for name, renderer in renderers:
        if name in sections:
            lines += ["", *renderer(sections[name])]
    return lines


def _goal_rows(sections: dict[str, Any]) -> list[str]:
    rows = []
    if "e2e" in sections:
        for q, v in sections["e2e"]["variants"].items():
            if "ratio" in v:
                r = v["ratio"]
                rows.append(
                    f"| e2e tokens/s, grpo-ray / TRL ({q}) | {fmt_range(r, 2, unit='x')} | >= 2.0x | {goal_check(r['median'], 2.0)} |"
                )
            else:
                rows.append(
                    f"| e2e tokens/s, grpo-ray / TRL ({q}) | TRL {v['trl']['skipped']} | >= 2.0x | – |"
                )
    if "rollout_overhead" in sections:
        r = sections["rollout_overhead"]["ratio"]
        rows.append(
            f"| rollout, RolloutWorker / bare vLLM | {fmt_range(r, 3, unit='x')} | >= 0.95x | {goal_check(r['median'], 0.95)} |"
        )
    if "sync_cost" in sections:
        for key, cell in sections["sync_cost"]["bench_model"].items():
            share = cell["share"]
            rows.append(
                f"| sync share of step, 22.9M {key} | {fmt_range(share, 2, scale=100, unit='%')} | <= 2% | "
                f"{goal_check(share['median'], 0.02, False)} |"
            )
        big = sections["sync_cost"]["big_model"]
        for key, cell in big.get("cells", {}).items():
            rows.append(
                f"| sync share of step, 0.5B {key} (est. step) | {cell['share'] * 100:.2f}% | <= 2% | "
                f"{goal_check(cell['share'], 0.02, False)} |"
            )
    if "learner_efficiency" in sections:
        for q, v in sections["learner_efficiency"]["variants"].items():
            for label, key in (("", "ratio"), (", prompt sharing off", "ratio_unshared")):
                r = v[key]
                rows.append(
                    f"| learner tokens/s, train_step / plain PEFT ({q}{label}) | {fmt_range(r, 3, unit='x')} | >= 0.9x | "
                    f"{goal_check(r['median'], 0.9)} |"
                )
    if "chunked_logprobs" in sections:
        section = sections["chunked_logprobs"]
        for length, cell in section["memory"].items():
            shrink = cell["logits_shrink"]
            rows.append(
                f"| train_step logits memory, unchunked / chunked ({length} new tokens, 152k vocab) | "
                f"{shrink:.1f}x | >= {chunked_logprobs.MEMORY_GOAL:.0f}x | {goal_check(shrink, chunked_logprobs.MEMORY_GOAL)} |"
            )
        r = section["speed"]["ratio"]
        rows.append(
            f"| learner tokens/s, chunked / unchunked logprobs (bench) | {fmt_range(r, 3, unit='x')} | "
            f">= {chunked_logprobs.SPEED_GOAL:.2f}x | {goal_check(r['median'], chunked_logprobs.SPEED_GOAL)} |"
        )
    return rows


if __name__ == "__main__":
    sys.exit(main())
