"""``cvlab bench NAME [options]``: throughput and peak memory of each method's hot loop.

Benchmarks print numbers; they are not timed tests. Record results in docs/PERFORMANCE.md with the
hardware. ``cvlab bench list`` shows the registered names.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

_BENCHMARKS: dict[str, Callable[[list[str]], int]] = {}


def register_benchmark(name: str) -> Callable[[Callable[[list[str]], int]], Callable[[list[str]], int]]:
    def deco(fn: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
        _BENCHMARKS[name] = fn
        return fn

    return deco


def _load_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


def main(argv: list[str]) -> int:
    _load_all()
    if not argv or argv[0] in ("list", "-h", "--help"):
        print("benchmarks: " + ", ".join(sorted(_BENCHMARKS)))
        print("usage: cvlab bench NAME [--help]")
        return 0
    if argv[0] not in _BENCHMARKS:
        print(f"unknown benchmark {argv[0]!r}; available: {', '.join(sorted(_BENCHMARKS))}")
        return 2
    return _BENCHMARKS[argv[0]](argv[1:])
