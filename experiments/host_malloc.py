"""Host-memory settings for CPU runs: fewer page faults for the large tensors of a training step.

Two settings, both applied by every ``cvlab`` process on Linux:

- :func:`prefer_huge_pages` (at import of :mod:`experiments`): PyTorch's transparent-huge-page
  allocation for large CPU tensors (2 MB pages: ~20x fewer faults; docs/PERFORMANCE.md, "CPU
  allocation"). Opt out with ``THP_MEM_ALLOC_ENABLE=0``.
- :func:`keep_freed_host_memory` (at the start of ``cvlab``): freed blocks stay in the heap for reuse,
  so they are not faulted in again at all. Described below.

glibc's ``malloc`` serves blocks above its mmap threshold (at most 32 MB when it adapts the threshold
itself) with a fresh ``mmap`` and gives them back with ``munmap`` when freed. A CPU training step
allocates and frees the same large activation and gradient buffers every step, so each step pays a
page fault per 4 KB of them, and the kernel zeroes every page: in Dataset Condensation's real-gradient
pass (64 MNIST images through ConvNet-3, a 32 MB float32 buffer around layer 1) that was ~9,000 faults
and 12-18% of the step (docs/PERFORMANCE.md, Dataset Condensation). Raising the mmap threshold and the
trim threshold keeps those blocks in the heap for reuse: the same numbers, no faults.

The cost: the process's resident memory stays at its peak instead of shrinking after a large free.
``cvlab`` applies this at start-up on Linux with glibc; ``CVLAB_MALLOC=default`` leaves glibc's
behaviour untouched (for example, to time a baseline as its own code would run).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys


def prefer_huge_pages() -> None:
    """Default ``THP_MEM_ALLOC_ENABLE=1`` on Linux (read by PyTorch at the first large allocation)."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 30  # blocks up to 1 GiB come from the heap (and stay there once freed)
TRIM_THRESHOLD_BYTES = (1 << 31) - 1  # never give the top of the heap back (mallopt takes an int)


def keep_freed_host_memory(environ: os._Environ[str] | dict[str, str] | None = None) -> bool:
    """Raise glibc's mmap and trim thresholds for this process; ``True`` if applied.

    A no-op (``False``) when ``CVLAB_MALLOC=default``, off Linux, or when the C library is not glibc.
    """
    env = os.environ if environ is None else environ
    choice = env.get("CVLAB_MALLOC", "keep")
    if choice == "default":
        return False
    if choice != "keep":
        from cvlab.errors import CvlabError

        raise CvlabError(f"CVLAB_MALLOC must be 'keep' (the default) or 'default'; got {choice!r}")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 -- glibc only (musl has no such mallopt options)
    except (OSError, AttributeError):
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(MMAP_THRESHOLD_BYTES))
    ok &= libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(TRIM_THRESHOLD_BYTES))
    return bool(ok)
