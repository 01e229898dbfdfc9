"""`pkm <command>`: the command table. It parses arguments and calls each package's functions.

It sits at the top of the package graph (nothing imports it) and each package registers its own
sub-commands from its `cli.py` (`register(subparsers)`, handlers named `cmd_<command>`). Heavy imports
(torch, megatron) happen inside the handlers, so `pkm launch` and `pkm --help` stay light.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


def _user_errors() -> tuple[type[BaseException], ...]:
    from data_pipeline.errors import DataError
    from launch.errors import LaunchError
    from model.errors import ModelError
    from pretrain.config import ConfigError
    from pretrain.errors import PretrainError

    return (ConfigError, DataError, LaunchError, ModelError, PretrainError)


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line too (`pkm: error: ...`), like every other user error; sub-command
    parsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"pkm: error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from data_pipeline import cli as data_cli
    from launch import cli as launch_cli
    from pretrain import cli as pretrain_cli
    from pretrain.online_eval import cli as eval_cli

    parser = _Parser(prog="pkm", description="Pretrain language models with Product Key Memory layers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    pretrain_cli.register(sub)
    data_cli.register(sub)
    launch_cli.register(sub)
    eval_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pretrain.log import quiet_third_party

    quiet_third_party()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may come after options (`pkm pretrain --config C --resume auto a.b=1`)
    if (
        extra
        and isinstance(getattr(args, "overrides", None), list)
        and all("=" in e and not e.startswith("-") for e in extra)
    ):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    errors = _user_errors()
    previous = signal.signal(signal.SIGTERM, _interrupt) if args.command in _INTERRUPTIBLE else None
    try:
        rc = args.func(args)
    except errors as e:
        print(f"pkm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        name = e.args[0] if e.args else "SIGINT"
        print(f"pkm: interrupted ({name})", file=sys.stderr)
        return 128 + getattr(signal, name, signal.SIGINT)
    finally:
        if previous is not None:  # main() called from Python (tests): leave the caller's handler as it was
            signal.signal(signal.SIGTERM, previous)
    return int(rc or 0)


# Commands whose SIGTERM unwinds like Ctrl-C, so their temporary outputs are removed on the way out
# (pretrain handles SIGTERM itself: checkpoint and exit 75; launch hands the terminal to torchrun).
_INTERRUPTIBLE = ("data", "export", "finetune", "eval")


_MAIN_PID = os.getpid()


def _interrupt(signum, frame):
    if os.getpid() != _MAIN_PID:
        # A forked worker (tokenizer pools, datatrove tasks) inherits this handler: it must die as
        # SIGTERM intends, or Pool.terminate() waits forever on a worker blocked in a queue lock.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    sys.exit(main())
