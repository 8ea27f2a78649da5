"""cvlab experiments: the CLI, the stage runner, benchmarks and the configs."""

import os
import sys

# Large CPU tensors (a batch of activations is tens of MB) are mmap'ed fresh by malloc on every
# allocation and fault in 4 KB at a time; PyTorch's transparent-huge-page allocation (2 MB pages,
# read lazily at the first large allocation) faults ~20x less and saves a few percent of wall time
# in the LRA loop (docs/PERFORMANCE.md, "CPU allocation"). Opt out with THP_MEM_ALLOC_ENABLE=0.
if sys.platform.startswith("linux"):
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
