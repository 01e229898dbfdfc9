"""What every benchmark script shares: progress on stderr, a free port, and the `--json` last line."""

from __future__ import annotations

import json
import socket
import sys


def log(msg: str) -> None:
    """Progress goes to stderr: stdout holds the figures (and, with --json, ends with one JSON object)."""
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emit(result: dict, as_json: bool) -> dict:
    """With --json, the result is the last line of stdout (one JSON object); returned either way."""
    if as_json:
        print(json.dumps(result), flush=True)
    return result
