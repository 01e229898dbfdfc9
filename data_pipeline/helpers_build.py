"""megatron-core's C++ dataset helpers (sample/blend index builders): check, compile if missing.

The megatron-core wheel ships a prebuilt `helpers_cpp` extension; source installs may not. Its own
`compile_helpers()` runs `make` in the package directory (no Makefile ships in the wheel) and calls
`sys.exit(1)` on failure, so we never call it. Instead, when the extension does not import, we
compile the bundled `helpers.cpp` with pybind11 and the system C++ compiler, into a temporary name
that is renamed into place.

    python -m data_pipeline.helpers_build      # or: pkm data build-helpers
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import sysconfig

from data_pipeline.errors import DataError


def _datasets_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec("megatron.core.datasets")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("megatron-core is not installed (pip install megatron-core)")
    return list(spec.submodule_search_locations)[0]


def helpers_importable() -> bool:
    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
        return True
    except ImportError:
        return False


def compile_helpers(out_dir: str | None = None, cxx: str | None = None) -> str:
    """Compile helpers.cpp into OUT_DIR/helpers_cpp<EXT_SUFFIX> (default: megatron's package dir)."""
    try:
        import pybind11
    except ImportError:
        raise DataError("compiling megatron's dataset helpers needs pybind11: pip install pybind11") from None
    src_dir = _datasets_dir()
    src = os.path.join(src_dir, "helpers.cpp")
    if not os.path.isfile(src):
        raise DataError(f"{src}: missing; reinstall megatron-core")
    out_dir = out_dir or src_dir
    target = os.path.join(out_dir, "helpers_cpp" + sysconfig.get_config_var("EXT_SUFFIX"))
    tmp = f"{target}.tmp{os.getpid()}"
    cmd = [
        cxx or os.environ.get("CXX", "g++"),
        "-O3",
        "-Wall",
        "-shared",
        "-std=c++17",
        "-fPIC",
        "-fdiagnostics-color",
        f"-I{pybind11.get_include()}",
        f"-I{sysconfig.get_paths()['include']}",
        src,
        "-o",
        tmp,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise DataError(f"compiling {src} failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    os.replace(tmp, target)
    return target


def ensure_helpers() -> str:
    """Return a one-line status; compiles the helpers only if the shipped extension does not import."""
    if helpers_importable():
        import megatron.core.datasets.helpers_cpp as h

        return f"megatron-core dataset helpers OK: {h.__file__}"
    path = compile_helpers()
    importlib.invalidate_caches()
    if not helpers_importable():
        raise DataError(f"compiled {path} but it does not import")
    return f"megatron-core dataset helpers compiled: {path}"


if __name__ == "__main__":
    try:
        print(ensure_helpers())
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
