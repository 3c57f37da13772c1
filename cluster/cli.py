"""The `grpo-ray` command. Errors a user can fix are printed as one message, without a traceback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cluster.config import ConfigError, RunConfig, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grpo-ray", description="Distributed GRPO with vLLM, Ray and QLoRA."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run GRPO training from a YAML config")
    train.add_argument("config", help="YAML run config, e.g. configs/demo.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. steps=5")
    train.add_argument(
        "--resume", action="store_true", help="continue from the run's newest complete checkpoint"
    )

    check = commands.add_parser(
        "check", help="validate a config, print the plan and memory budget; loads no model"
    )
    check.add_argument("config", help="YAML run config")
    check.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    check.add_argument("--device-gib", type=float, default=24.0, help="GPU memory to plan for (default 24)")

    evaluate = commands.add_parser(
        "eval", help="held-out accuracy of a run's adapter (or any PEFT adapter dir)"
    )
    evaluate.add_argument(
        "target", help="a run directory, a checkpoint directory, or a PEFT adapter directory"
    )
    evaluate.add_argument("--config", help="run config (default: the run directory's config.yaml)")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")

    export = commands.add_parser("export", help="write the trained policy as a full model directory")
    export.add_argument("run_dir", help="a run directory (its final adapter) or a checkpoint directory")
    export.add_argument(
        "--merged", required=True, metavar="OUT", help="output directory for the merged model"
    )
    export.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weights dtype (default: the run's rollout dtype)",
    )

    scale = commands.add_parser(
        "scale", help="resize a running run's rollout pool (applied at its next step boundary)"
    )
    scale.add_argument("run_dir", help="the run directory (RUN_ROOT/NAME)")
    scale.add_argument("workers", type=int, help="rollout workers wanted")

    report = commands.add_parser("report", help="write RUN_DIR/report/index.html with plots of the run")
    report.add_argument("run_dir", help="a run directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; completed checkpoints are kept (resume with --resume)", file=sys.stderr)
        return 130
    except Exception as err:  # errors raised on purpose carry their fix; anything else keeps its traceback
        from cluster.recovery import LearnerLostError
        from cluster.rollout_pool import RolloutPoolError, SyncError
        from rewards.base import RewardError

        if isinstance(err, (SyncError, RewardError, RolloutPoolError, LearnerLostError)):
            print(f"error: {err}", file=sys.stderr)
            return 1
        raise


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "train":
        from cluster.driver import run

        run(load_config(args.config, [*args.overrides, *(["resume=auto"] if args.resume else [])]))
    elif args.command == "check":
        _check(load_config(args.config, args.overrides), args.device_gib)
    elif args.command == "eval":
        from cluster.driver import evaluate_adapter

        target = Path(args.target)
        cfg = load_config(args.config or _run_config(target), args.overrides)
        print(f"held-out accuracy: {evaluate_adapter(cfg, _adapter_dir(target)):.3f}")
    elif args.command == "export":
        from cluster.export import export_merged

        target = Path(args.run_dir)
        cfg = load_config(_run_config(target))
        out = export_merged(cfg, _adapter_dir(target), Path(args.merged), args.dtype or cfg.rollout.dtype)
        print(f"merged model written to {out}")
    elif args.command == "scale":
        from cluster.scale import request_pool_size

        path = request_pool_size(Path(args.run_dir), args.workers)
        print(f"asked for {args.workers} rollout worker(s) in {path}; the run applies it at its next step")
    elif args.command == "report":
        from cluster.telemetry.report import write_report

        print(f"report written to {write_report(Path(args.run_dir))}")
    return 0


def _check(cfg: RunConfig, device_gib: float) -> None:
    from cluster.planning.batch_plan import derive_plan

    print(derive_plan(cfg).render(cfg))
    try:
        from cluster.planning.memory import ModelShape, inputs_from_config, plan_memory
    except ImportError:
        print("config ok")
        return
    try:
        shape = ModelShape.from_pretrained(
            str(cfg.resolve_path(cfg.model)) if cfg.resolve_path(cfg.model).exists() else cfg.model
        )
    except Exception as err:  # offline and not cached: the plan above is still valid
        print(f"memory plan skipped: could not read the model's config.json ({err})")
        print("config ok")
        return
    memory = plan_memory(inputs_from_config(cfg, shape, device_gib))
    print(memory.render())
    if not memory.fits:
        raise ConfigError(f"the run does not fit in {device_gib:g} GiB:\n  " + "\n  ".join(memory.advice))
    print("config ok")


def _run_config(target: Path) -> Path:
    for candidate in (
        target / "config.yaml",
        target.parent / "config.yaml",
        target.parent.parent / "config.yaml",
    ):
        if candidate.exists():
            return candidate
    raise ConfigError(f"no config.yaml found for '{target}'; pass --config CONFIG")


def _adapter_dir(target: Path) -> Path:
    """A run dir's final adapter, a checkpoint's adapter, or the directory itself if it is an adapter."""
    for candidate in (target / "adapter", target):
        if (candidate / "adapter_config.json").exists():
            return candidate
    raise ConfigError(
        f"'{target}' holds no PEFT adapter (adapter_config.json): give a run directory, a checkpoint, or an adapter"
    )


if __name__ == "__main__":
    sys.exit(main())
