"""The `grpo-ray` command: train, check. Errors a user can fix are printed without a traceback."""

from __future__ import annotations

import argparse
import sys

from cluster.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="grpo-ray", description="Distributed GRPO with vLLM, Ray and QLoRA."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("train", "run GRPO training from a YAML config"),
        ("check", "validate a config and print the derived plan; loads no model"),
    ):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("config", help="path to a YAML run config, e.g. configs/demo.yaml")
        sub.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help="dotted overrides, e.g. steps=5 learner.lora.rank=8",
        )
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "check":
            from cluster.plan import derive_plan

            print(derive_plan(cfg).render(cfg))
            print("config ok")
            return 0
        from cluster.driver import run

        run(cfg)
        return 0
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # errors we raise on purpose carry a fix; anything else keeps its traceback
        from cluster.fleet import SyncError
        from rewards.base import RewardError

        if isinstance(err, (SyncError, RewardError)):
            print(f"error: {err}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
