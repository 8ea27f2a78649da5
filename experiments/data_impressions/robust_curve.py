"""Robust against clean accuracy of distilled students, from a ``cvlab run <robust_curve pipeline> --seeds N`` folder.

Students that learned from different data (impressions, an arbitrary transfer set, real data) reach very different
clean accuracies at any fixed budget, and robust accuracy follows clean accuracy, so comparing them at one budget
confounds the two. The robust-curve pipeline trains each arm at several budgets; this report reads every seed's
severity report (``<folder>/seed-<s>/robustness-<hash>/severity_report.csv``; models named ``<arm>_<budget>``) and

- prints per student the mean +- sd over seeds of clean accuracy and adversarial accuracy under each attack and eps;
- compares the arms at matched clean accuracy: per seed, each arm's (clean, robust) points are joined in order of
  clean accuracy and read at the given clean levels (linear interpolation, never extrapolated: an arm whose points do
  not span a level has no value there); mean +- sd over the seeds that have one, and with ``--baseline ARM`` every
  other arm's per-seed difference to that arm;
- draws robust against clean accuracy, one panel per attack and eps (not the noise control), one colour per arm,
  one line per seed.

    uv run python -m experiments.data_impressions.robust_curve runs/data_impressions_robust_curve_mnist \\
        --out docs/img/data_impressions/robust_curve_mnist.png
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from cvlab.errors import CvlabError
from cvlab.records import mean_sd

#: the (attack, eps) columns read by default
DEFAULT_ATTACKS = ("fgsm@0.1", "pgd@0.1", "pgd@0.2", "noise@0.2")
Point = tuple[float, float]  # (clean accuracy, adversarial accuracy), fractions


def split_name(model: str) -> tuple[str, str]:
    """``"impressions_e20"`` -> ``("impressions", "e20")``: the arm and the budget of a report model name."""
    arm, sep, budget = model.rpartition("_")
    if not sep or not arm:
        raise CvlabError(f"model {model!r}: robust-curve models are named <arm>_<budget>, e.g. real_s50")
    return arm, budget


def read_reports(folder: Path) -> dict[int, list[dict[str, str]]]:
    """``{seed: severity_report.csv rows}`` of every finished robustness stage under ``folder``."""
    from experiments.pipeline import finished_stages

    out = {}
    for seed, stage_dir in finished_stages(folder, "robustness").items():
        if (stage_dir / "severity_report.csv").is_file():
            with open(stage_dir / "severity_report.csv", newline="") as f:
                out[seed] = list(csv.DictReader(f))
    return out


def points(rows: list[dict[str, str]], attack: str, eps: float) -> dict[str, dict[str, Point]]:
    """``{arm: {budget: (clean, adversarial accuracy)}}`` of one seed's report under ``attack`` at ``eps``."""
    out: dict[str, dict[str, Point]] = {}
    for r in rows:
        if r["attack"] == attack and abs(float(r["eps"]) - eps) < 1e-9:
            arm, budget = split_name(r["model"])
            out.setdefault(arm, {})[budget] = (float(r["clean_accuracy"]), float(r["adv_accuracy"]))
    return out


def at_clean(pts: list[Point], level: float) -> float | None:
    """The adversarial accuracy of the piecewise-linear curve through ``pts`` (joined in order of clean accuracy) at
    clean accuracy ``level``; ``None`` outside the points' clean range (never extrapolated)."""
    pts = sorted(pts)
    if not pts or not pts[0][0] <= level <= pts[-1][0]:
        return None
    for (c0, a0), (c1, a1) in zip(pts, pts[1:]):
        if c0 <= level <= c1:
            return a0 if c1 == c0 else a0 + (a1 - a0) * (level - c0) / (c1 - c0)
    return pts[0][1]  # a single point exactly at the level


def _fmt(vs: list[float]) -> str:
    """Fractions as ``mean +- sd (n=...)`` in % (or points, for differences); ``-`` when there is none."""
    if not vs:
        return "-"
    m, s = mean_sd([100 * v for v in vs])
    return f"{m:.1f} +- {s:.1f} (n={len(vs)})"


def arm_names(reports: dict[int, list[dict[str, str]]]) -> list[str]:
    """The arms of the reports' models, in order of first appearance."""
    return list(dict.fromkeys(split_name(r["model"])[0] for rows in reports.values() for r in rows))


def student_table(reports: dict[int, list[dict[str, str]]], attacks: list[tuple[str, float]]) -> str:
    """Per student (arm, budget), mean +- sd over seeds of clean accuracy and of each attack's accuracy, in %."""
    head = ["student", "clean acc %"] + [f"{a} eps {e:g} acc %" for a, e in attacks]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    models = list(dict.fromkeys(r["model"] for rows in reports.values() for r in rows))
    by_attack = {(a, e): [points(rows, a, e) for rows in reports.values()] for a, e in attacks}  # read once
    for m in models:
        arm, budget = split_name(m)
        clean, cols = [], []
        for a, e in attacks:
            per_seed = [pts.get(arm, {}).get(budget) for pts in by_attack[a, e]]
            cols.append(_fmt([p[1] for p in per_seed if p is not None]))
            if not clean:
                clean = [p[0] for p in per_seed if p is not None]
        lines.append("| " + " | ".join([m, _fmt(clean)] + cols) + " |")
    return "\n".join(lines)


def matched_table(reports: dict[int, list[dict[str, str]]], attacks: list[tuple[str, float]],
                  levels: list[float], baseline: str | None = None) -> str:
    """Per attack, eps and clean level, each arm's adversarial accuracy read off its curve, mean +- sd over the seeds
    whose curve spans the level (n); with ``baseline`` (an arm) also every other arm minus it, paired per seed (the
    seeds where both curves span the level), in points."""
    arms = arm_names(reports)
    if baseline is not None and baseline not in arms:
        raise CvlabError(f"--baseline {baseline!r}: no such arm (arms: {', '.join(arms)})")
    others = [arm for arm in arms if baseline is not None and arm != baseline]
    head = (["attack, eps", "clean acc %"] + [f"{arm} %" for arm in arms]
            + [f"{arm} minus {baseline}, points" for arm in others])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for a, e in attacks:
        curves = [points(rows, a, e) for rows in reports.values()]  # per seed, read once for every level
        for level in levels:
            read = {arm: [at_clean(list(c.get(arm, {}).values()), level) for c in curves] for arm in arms}
            cells = [_fmt([v for v in read[arm] if v is not None]) for arm in arms]
            cells += [_fmt([x - y for x, y in zip(read[arm], read[baseline]) if x is not None and y is not None])
                      for arm in others]
            lines.append("| " + " | ".join([f"{a} {e:g}", f"{100 * level:g}"] + cells) + " |")
    return "\n".join(lines)


def plot(reports: dict[int, list[dict[str, str]]], attacks: list[tuple[str, float]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(arm_names(reports), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.2 * len(attacks), 4), squeeze=False)
    for ax, (a, e) in zip(axes[0], attacks):
        for i, (seed, rows) in enumerate(sorted(reports.items())):
            for arm, pts in points(rows, a, e).items():
                xs, ys = zip(*sorted(pts.values()))
                ax.plot([100 * x for x in xs], [100 * y for y in ys], "o-", color=colours[arm], alpha=0.8,
                        label=arm if i == 0 else None, markersize=4)
        ax.plot([0, 100], [0, 100], ":", color="grey", linewidth=0.8)
        ax.set(title=f"{a}, eps {e:g}", xlabel="clean accuracy %", ylabel="adversarial accuracy %", xlim=(0, 100),
               ylim=(0, 100))
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def parse_attacks(specs: list[str]) -> list[tuple[str, float]]:
    out = []
    for s in specs:
        name, _, eps = s.partition("@")
        try:
            out.append((name, float(eps)))  # no "@" leaves eps empty: not a number
        except ValueError:
            raise CvlabError(f"attack {s!r}: give <attack>@<eps>, e.g. pgd@0.1") from None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.data_impressions.robust_curve",
                                description=__doc__.split("\n")[0])
    p.add_argument("folder", help="<root>/<pipeline name> of a `cvlab run ... --seeds N`")
    p.add_argument("--attacks", nargs="+", default=list(DEFAULT_ATTACKS), help="<attack>@<eps> columns")
    p.add_argument("--levels", nargs="+", type=float, default=[0.3, 0.4, 0.5, 0.6],
                   help="clean accuracies (fractions) at which the arms are compared")
    p.add_argument("--baseline", default=None, help="an arm: every other arm's paired difference to it as well")
    p.add_argument("--out", default=None, help="the picture (PNG); default <folder>/robust_curve.png")
    a = p.parse_args(argv)
    folder = Path(a.folder)
    reports = read_reports(folder)
    if not reports:
        raise CvlabError(f"{folder}: no seed-<s>/robustness-<hash>/ with a finished severity_report.csv")
    attacks = parse_attacks(a.attacks)
    print(f"{len(reports)} seeds: {sorted(reports)}\n")
    print(student_table(reports, attacks) + "\n")
    crafted = [t for t in attacks if t[0] != "noise"] or attacks  # the noise control is no attack to match on
    print(matched_table(reports, crafted, a.levels, a.baseline) + "\n")
    out = plot(reports, crafted, Path(a.out) if a.out else folder / "robust_curve.png")
    print(f"picture: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
