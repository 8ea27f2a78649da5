"""Compare the run folders of two ``recheck_mnist_short.sh`` outputs: every metric but wall times must be equal.

    uv run python -m experiments.maintenance.compare_metrics <before> <after>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TIMING = ("wall", "per_s", "_s/", "time", "epoch_s")


def compare(before: Path, after: Path) -> list[str]:
    """One line per run: how many metrics were compared and which differ (empty list of differences = equal)."""
    lines = []
    for m in sorted(before.glob("*/metrics.json")):
        a, b = json.loads(m.read_text()), json.loads((after / m.parent.name / "metrics.json").read_text())
        keys = [k for k in a if not any(t in k for t in TIMING)]
        diff = [k for k in keys if a[k] != b.get(k)]
        lines.append(
            f"{m.parent.name}: {len(keys)} metrics, {'equal' if not diff else 'DIFFERENT: ' + ', '.join(diff)}"
        )
    return lines


if __name__ == "__main__":
    out = compare(Path(sys.argv[1]), Path(sys.argv[2]))
    print("\n".join(out))
    sys.exit(any("DIFFERENT" in line for line in out))
