"""cvlab experiments: the CLI, the stage runner, benchmarks and the configs."""

from experiments.host_malloc import prefer_huge_pages

# before torch's first large allocation; see experiments/host_malloc.py (opt out: THP_MEM_ALLOC_ENABLE=0)
prefer_huge_pages()
