"""experiments.host_malloc: freed CPU tensors stay in the heap, so re-allocating them costs no page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cvlab.errors import CvlabError
from experiments.host_malloc import keep_freed_host_memory

# Allocate and free a 48 MB tensor 20 times (the first allocation is not counted), as a training step
# does with its activations, and print the page faults the loop took.
_SCRIPT = """
import resource, sys, torch
from experiments.host_malloc import keep_freed_host_memory
applied = keep_freed_host_memory()
torch.ones(12 * 2**20).sum()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.ones(12 * 2**20).sum()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env={"CVLAB_MALLOC": mode, "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_tensors_are_reused_without_page_faults():
    runs = [_faults("keep") for _ in range(3)]
    applied, kept = runs[0][0], min(n for _, n in runs)  # the kernel's own reclaim can add faults to one run
    if applied != "True":
        pytest.skip("not glibc")
    untouched, default = _faults("default")
    assert untouched == "False"
    # glibc's default: every 48 MB allocation is a fresh mmap, faulted in again (how many faults that
    # is depends on the kernel's huge-page setting); kept: the heap block is reused
    assert default >= 20 * 24, default  # at least one fault per 2 MB page per allocation
    # (a fresh environment measured 536-5,360 faults kept vs 10,729 by default; the run it came from, 1)
    assert kept * 4 < default, (kept, default)


def test_bad_setting_is_refused():
    with pytest.raises(CvlabError, match="CVLAB_MALLOC"):
        keep_freed_host_memory({"CVLAB_MALLOC": "tcmalloc"})
    assert keep_freed_host_memory({"CVLAB_MALLOC": "default"}) is False
