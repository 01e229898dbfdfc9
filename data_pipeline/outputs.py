"""Outputs written whole or not at all, and OS errors on them as one-line user errors.

Every command that writes a file or directory goes through `atomic_output`: the content is written
under a hidden temporary name beside the final one and renamed at the end, so an interrupted command
(Ctrl-C, SIGTERM, a full disk) leaves nothing under the final name, and the temporary is removed.
It lives here, at the bottom of the dependency graph, so that data_pipeline, pretrain and launch
share it (the CLI prints an OutputError as `pkm: error: ...`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from data_pipeline.errors import DataError


class OutputError(DataError):
    """An output that cannot be written: the message names the path and the reason."""


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def ensure_dir(path: str | Path) -> Path:
    """Create directory `path` (and its parents); OutputError naming it if that is impossible."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(
            f"{path}: cannot create the output directory (a file of that name, or one of its parents, is in the way)"
        ) from None
    except OSError as e:
        raise OutputError(f"{path}: cannot create the output directory ({_reason(e)})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: output directory is not writable")
    return path


def check_writable(path: str | Path) -> Path:
    """Fail early, creating nothing, when output `path` (a file or directory, existing or not) could not
    be written: a command checks this before its long part, and writes at the end."""
    path = Path(path)
    probe = path.absolute()
    while not probe.exists() and not probe.is_symlink():
        probe = probe.parent
    if probe != path.absolute() and not probe.is_dir():
        raise OutputError(f"{path}: cannot be created ({probe} is a file, not a directory)")
    target = probe if probe.is_dir() else probe.parent
    if not os.access(target, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot be written ({target} is not writable)")
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so writers that go by it still work) to
    write a file or a directory to; on success rename it to `path` (replacing a file, or a directory
    the caller chose to replace), on any error or interrupt remove it. OSErrors while writing or
    publishing become an OutputError naming `path`."""
    path = Path(path)
    ensure_dir(path.parent)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    _remove(tmp)
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            _remove(path)  # os.replace cannot replace a non-empty directory
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({_reason(e)})") from None
    finally:
        _remove(tmp)


@contextmanager
def scratch_dir(near: str | Path) -> Iterator[Path]:
    """A hidden temporary directory inside directory `near` (same filesystem, so its files can be
    renamed into place), removed at the end whatever happens."""
    import tempfile

    near = ensure_dir(near)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".pkm-tmp-", dir=near))
    except OSError as e:
        raise OutputError(f"{near}: cannot write ({_reason(e)})") from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: str | Path, path: str | Path) -> Path:
    """Rename a finished temporary file to its final name; OutputError naming it if that fails."""
    try:
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({_reason(e)})") from None
    return Path(path)
