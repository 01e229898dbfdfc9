"""`pkm <group> <command>`: a thin layer that parses arguments and calls each package's functions.

Each package registers its own sub-commands (data_pipeline.cli, launch.cli, pretrain.commands);
heavy imports (torch, megatron) happen inside the command functions so `pkm launch` stays light.
"""
from __future__ import annotations

import argparse
import sys


def _user_errors() -> tuple[type[BaseException], ...]:
    from data_pipeline.errors import DataError
    from launch.errors import LaunchError
    from model.errors import ModelError
    from pretrain.errors import PretrainError
    from pretrain.config import ConfigError

    return (ConfigError, DataError, LaunchError, ModelError, PretrainError)


def build_parser() -> argparse.ArgumentParser:
    from data_pipeline import cli as data_cli
    from launch import cli as launch_cli
    from pretrain import commands
    from pretrain import export_cli
    from pretrain.online_eval import cli as eval_cli

    parser = argparse.ArgumentParser(prog="pkm", description="Pretrain language models with Product Key Memory layers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    commands.register(sub)
    data_cli.register(sub)
    launch_cli.register(sub)
    eval_cli.register(sub)
    export_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pretrain.log import quiet_third_party

    quiet_third_party()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may come after options (`pkm pretrain --config C --resume auto a.b=1`)
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
            "=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    errors = _user_errors()
    try:
        rc = args.func(args)
    except errors as e:
        print(f"pkm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pkm: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
