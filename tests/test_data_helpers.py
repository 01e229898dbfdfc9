"""megatron-core's C++ dataset helpers: the shipped extension imports (so nothing is compiled), and
`compile_helpers` builds an equivalent extension from the wheel's helpers.cpp when one is needed."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest

from data_pipeline.helpers_build import compile_helpers, ensure_helpers


def test_shipped_helpers_import():
    assert ensure_helpers().startswith("megatron-core dataset helpers OK")


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("pybind11") is None or shutil.which("g++") is None,
    reason="compiling the helpers needs pybind11 (pip install pybind11) and g++",
)
def test_compiled_helpers_match_shipped(tmp_path):
    from megatron.core.datasets import helpers_cpp as shipped

    path = compile_helpers(str(tmp_path))  # into a scratch dir: the installed extension is left alone
    spec = importlib.util.spec_from_file_location("helpers_cpp", path)
    built = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(built)
    sizes = np.random.RandomState(0).randint(1, 300, size=500).astype(np.int32)
    docs = np.tile(np.arange(500, dtype=np.int32), 2)  # two epochs of documents
    args = (sizes, docs, 64, 2, int(sizes.sum()), True, 1)
    assert np.array_equal(built.build_sample_idx_int32(*args), shipped.build_sample_idx_int32(*args))
    w = np.array([0.3, 0.7])
    a_idx, a_sample = np.zeros(1000, np.int16), np.zeros(1000, np.int64)
    b_idx, b_sample = np.zeros(1000, np.int16), np.zeros(1000, np.int64)
    built.build_blending_indices(a_idx, a_sample, w, 2, 1000, False)
    shipped.build_blending_indices(b_idx, b_sample, w, 2, 1000, False)
    assert np.array_equal(a_idx, b_idx) and abs(a_idx.mean() - 0.7) < 0.01
