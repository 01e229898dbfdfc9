"""argparse types for numbers with a range: a bad value is the parser's one-line error naming the
option, before anything runs. Shared by every `pkm` command (data_pipeline is the bottom layer)."""

from __future__ import annotations

import argparse
import math
import os


def _number(kind, low, inclusive: bool, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or (value < low if inclusive else value <= low):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, 0, False, "a positive integer")
non_negative_int = _number(int, 0, True, "an integer >= 0")
positive_float = _number(float, 0.0, False, "a positive number")
non_negative_float = _number(float, 0.0, True, "a number >= 0")


def port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port (1..65535)")
    return value


def file_prefix(text: str) -> str:
    """An output PREFIX to which extensions are added (PREFIX.model, PREFIX.bin): not a directory."""
    if text.endswith(os.sep) or os.path.isdir(text):
        raise argparse.ArgumentTypeError(
            f"{text} is a directory; give a prefix for the files inside it, e.g. {os.path.join(text, 'name')}"
        )
    return text
