"""pretrain.cpu_alloc: with glibc keeping freed memory, a training-like loop that frees and
re-allocates the same large blocks stops page-faulting once its heap has grown; without, every
iteration faults its blocks in again. Run in subprocesses (the setting is process-wide)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

LOOP = r"""
import json, resource, sys, torch
from pretrain.cpu_alloc import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(16):
    f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    grad = torch.ones(16 << 20)       # 64 MB, e.g. a value-table gradient
    small = torch.ones(1000)          # something allocated after it, so the big block is not the heap top
    scratch = torch.ones(4 << 20)
    del grad, scratch
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
print(json.dumps({"took": took, "faults": faults}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", LOOP, mode], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings: Linux only")
def test_keep_freed_memory_stops_page_faults():
    pages = (16 << 20) * 4 // 4096  # pages of the 64 MB block
    default, keep = _faults("default"), _faults("keep")
    assert keep["took"] is True
    steady_default, steady_keep = default["faults"][6:], keep["faults"][6:]
    assert min(steady_default) > pages // 2, default  # glibc unmaps and re-maps it every time
    # Served from the kept heap: almost no faults. Not zero: the kernel may still fault a kept page now and
    # then (NUMA balancing's hinting faults; CI once saw one 16 MB block re-faulted in six iterations).
    assert sum(steady_keep) < sum(steady_default) / 10, (default, keep)
    assert sorted(steady_keep)[len(steady_keep) // 2] == 0, keep  # most iterations fault nothing
