"""Every entry point of grpo-ray: the `grpo-ray` command, and `python -m cluster.cli` for `ray job submit`.

    grpo-ray train CONFIG [key=value ...] [--resume]   CONFIG: a YAML path or a shipped name (`demo`)
    grpo-ray check CONFIG [key=value ...]              validate, print the plan and memory budget
    grpo-ray eval RUN_DIR | ADAPTER_DIR                held-out accuracy of an adapter
    grpo-ray export RUN_DIR --merged OUT               a full model directory
    grpo-ray report RUN_DIR                            RUN_DIR/report/index.html
    grpo-ray job runtime-env                           the runtime env JSON for `ray job submit`
    grpo-ray warm up CONFIG [key=value ...]            start a run's actors ahead (warm down, warm status)
    grpo-ray configs                                   the shipped configs, by name

Errors a user can fix are printed as one message, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cluster.config import ConfigError, RunConfig, load_config
from cluster.job import DEFAULT_UPLOAD_LIMIT_BYTES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grpo-ray", description="Distributed GRPO with vLLM, Ray and QLoRA."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run GRPO training from a YAML config")
    train.add_argument("config", help="YAML run config (e.g. configs/demo.yaml) or a shipped name (demo)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. steps=5")
    train.add_argument(
        "--resume", action="store_true", help="continue from the run's newest complete checkpoint"
    )

    check = commands.add_parser(
        "check", help="validate a config, print the plan and memory budget; loads no model"
    )
    check.add_argument("config", help="YAML run config or a shipped config's name")
    check.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    check.add_argument(
        "--device-gib",
        type=float,
        default=None,
        help="GPU memory to plan for (default: the config's gpu_memory_gib, else 24)",
    )

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

    job = commands.add_parser("job", help="helpers for `ray job submit`")
    job_commands = job.add_subparsers(dest="job_command", required=True)
    env = job_commands.add_parser(
        "runtime-env", help="print the job's runtime env as JSON (for ray job submit --runtime-env-json)"
    )
    env.add_argument(
        "--working-dir", type=Path, default=Path.cwd(), help="the checkout to upload (default: current dir)"
    )
    env.add_argument(
        "--limit-mib",
        type=float,
        default=DEFAULT_UPLOAD_LIMIT_BYTES / 2**20,
        help="fail if the upload is larger (default %(default)g)",
    )

    warm = commands.add_parser(
        "warm", help="keep a run's actors started on this machine, so `train` starts in seconds"
    )
    warm_commands = warm.add_subparsers(dest="warm_command", required=True)
    up = warm_commands.add_parser(
        "up", help="start the rollout workers and learner of CONFIG in the background; returns when built"
    )
    up.add_argument("config", help="YAML run config or a shipped config's name")
    up.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, as for train")
    up.add_argument(
        "--idle-minutes",
        type=float,
        default=120.0,
        help="stop after this long without a run (default %(default)g)",
    )
    down = warm_commands.add_parser("down", help="stop the warm pool (its Ray and every spare)")
    down.add_argument(
        "--force", action="store_true", help="stop it even while a run uses its actors (that run ends)"
    )
    warm_commands.add_parser("status", help="say whether a warm pool runs, for which config, how it is")

    commands.add_parser("configs", help="list the shipped run configs (give their name to train/check)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as usage:  # argparse printed --help, or a usage error (e.g. an override starting '-')
        if not usage.code:
            raise
        return usage.code if isinstance(usage.code, int) else 2
    try:
        return _dispatch(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # read-only filesystem, permissions, disk full: the user's to fix
        import errno

        if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT):
            raise
        from cluster.run_dir import describe_os_error

        print(f"error: {describe_os_error(err)}; free space or point run_root elsewhere", file=sys.stderr)
        return 1
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
    elif args.command == "job":
        return _job_runtime_env(args.working_dir, args.limit_mib)
    elif args.command == "warm":
        return _warm(args)
    elif args.command == "configs":
        _list_configs()
    return 0


def _job_runtime_env(working_dir: Path, limit_mib: float) -> int:
    """Print the runtime env JSON; 2 if `working_dir` is not a checkout, 1 if the upload is too big."""
    import json

    from cluster.job import CHECKOUT_SENTINEL, check_upload_size, runtime_env

    working_dir = working_dir.resolve()
    if not (working_dir / CHECKOUT_SENTINEL).is_file():
        print(
            f"error: {working_dir} is not a grpo-ray checkout (no {CHECKOUT_SENTINEL}); run from the "
            "repository root or pass --working-dir",
            file=sys.stderr,
        )
        return 2
    try:
        check_upload_size(working_dir, int(limit_mib * 2**20))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(runtime_env(working_dir)))
    return 0


def _warm(args: argparse.Namespace) -> int:
    from cluster.warm_pool import client
    from cluster.warm_pool.state import read_state

    if args.warm_command == "up":
        if not args.idle_minutes > 0:  # NaN too: it would never compare above the idle time
            raise ConfigError(
                f"--idle-minutes must be a number above 0 (inf: never), got {args.idle_minutes:g}"
            )
        try:
            client.warm_up(load_config(args.config, args.overrides), args.idle_minutes)
        except KeyboardInterrupt:
            print("interrupted; the warm pool that was starting is stopped", file=sys.stderr)
            return 130
    elif args.warm_command == "down":
        client.warm_down(force=args.force)
    else:
        print(client.describe(read_state()))
    return 0


def _list_configs() -> None:
    from grpo_ray.shipped import shipped_configs, summary_line

    configs = shipped_configs()
    width = max((len(name) for name in configs), default=0)
    for name, path in configs.items():
        print(f"{name:<{width}}  {summary_line(path)}\n{'':<{width}}  {path}")


def _check(cfg: RunConfig, device_gib: float | None) -> None:
    from cluster.planning.batch_plan import derive_plan
    from cluster.planning.model_limits import check_model_limits

    if device_gib is None:
        device_gib = cfg.gpu_memory_gib or 24.0

    print(derive_plan(cfg).render(cfg))
    check_model_limits(cfg)  # the model's own limits (context length, heads), named with both numbers
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
    from cluster.planning.sync_bytes import worker_merge_advice

    advice = worker_merge_advice(cfg, shape)
    if advice:
        print(advice)
    if not memory.fits:
        raise ConfigError(memory.refusal())
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
