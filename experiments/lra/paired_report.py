"""The paired LRA report of a ``cvlab run <lra pipeline> --seeds N`` folder: per seed, LRA minus its baseline
(``meta: none``; both arms share teacher, generator and student start and seed) of the final test accuracy and of
the retention measures, their mean +- sd over seeds, and one picture of both arms' retention curves per seed.

    uv run python -m experiments.lra.paired_report runs/lra_mnist_paired --out docs/img/lra/paired_curves.png

reads ``<folder>/seed-<s>/{lra,baseline}-<hash>/`` (``metrics.json`` and ``retention_curve.json`` of each finished
stage), prints a markdown table and writes the picture (one panel per seed: validation accuracy solid, mean accuracy
on the probe of earlier generated batches dashed, :func:`lit_modules.distillation.lra_retention.retention_figure`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cvlab.errors import CvlabError
from cvlab.records import mean_sd

ARMS = ("lra", "baseline")
#: (metrics.json key, column, scale to shown units)
COLUMNS = (("test/acc", "test acc %", 100.0), ("retention/probe_acc", "probe acc %", 100.0),
           ("retention/probe_forgetting", "probe forgetting, points", 100.0),
           ("retention/drops", "val drops", 1.0), ("retention/drop_total", "val drop total, points", 100.0))


def arm_folders(folder: Path) -> dict[int, dict[str, Path]]:
    """``{seed: {arm: stage folder}}`` of the finished arm stages (``stage.json`` present) under ``folder``."""
    from experiments.pipeline import finished_stages

    out: dict[int, dict[str, Path]] = {}
    for arm in ARMS:
        for seed, stage_dir in finished_stages(folder, arm).items():
            out.setdefault(seed, {})[arm] = stage_dir
    return {s: arms for s, arms in sorted(out.items()) if set(arms) == set(ARMS)}


def paired_table(metrics: dict[int, dict[str, dict[str, float]]]) -> str:
    """The markdown table: per seed and metric, LRA, baseline and LRA minus baseline; then mean +- sd over seeds.
    ``metrics``: ``{seed: {arm: metrics.json}}``."""
    seeds = sorted(metrics)
    head = ["seed"] + [f"{arm} {name}" for _, name, _ in COLUMNS for arm in (*ARMS, "lra-baseline")]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    cols: list[list[float | None]] = []
    for key, _, scale in COLUMNS:
        for arm in ARMS:
            cols.append([metrics[s][arm].get(key) for s in seeds])
        a, b = cols[-2], cols[-1]
        cols.append([None if x is None or y is None else x - y for x, y in zip(a, b)])
        for c in cols[-3:]:
            c[:] = [None if v is None else v * scale for v in c]
    for i, s in enumerate(seeds):
        rows.append("| " + " | ".join([str(s)] + ["-" if c[i] is None else f"{c[i]:.2f}" for c in cols]) + " |")
    summary = []
    for c in cols:
        vs = [v for v in c if v is not None]
        summary.append("{:.2f} +- {:.2f}".format(*mean_sd(vs)) if vs else "-")
    rows.append("| mean +- sd | " + " | ".join(summary) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.lra.paired_report", description=__doc__.split("\n")[0])
    p.add_argument("folder", help="<root>/<pipeline name> of a `cvlab run ... --seeds N`")
    p.add_argument("--out", default=None, help="the picture (PNG); default <folder>/paired_curves.png")
    a = p.parse_args(argv)
    folder = Path(a.folder)
    found = arm_folders(folder)
    if not found:
        raise CvlabError(f"{folder}: no seed-<s>/ with both finished arms ({', '.join(ARMS)})")
    metrics = {s: {arm: json.loads((d / "metrics.json").read_text()) for arm, d in arms.items()}
               for s, arms in found.items()}
    print(paired_table(metrics))
    import torch
    from torchvision.utils import save_image

    from lit_modules.distillation.lra_retention import retention_figure

    panels = [retention_figure({arm: json.loads((d / "retention_curve.json").read_text()) for arm, d in arms.items()},
                               title=f"seed {s}") for s, arms in sorted(found.items())]
    out = Path(a.out) if a.out else folder / "paired_curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.cat(panels, dim=3), out)
    print(f"picture: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
