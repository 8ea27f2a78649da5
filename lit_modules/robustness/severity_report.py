"""The severity report: attacks x architectures x eps, read through a class hierarchy (Mopuri, Shaj, Babu,
CVPR Workshops 2020, arXiv 2004.12771; the metrics are ours: :mod:`lit_modules.robustness.severity`).

:class:`SeverityReport` is a LightningModule run as a ``cvlab test`` stage. It holds no trainable weights: it
loads the trained ``models`` (any cvlab checkpoints, by name), and on every test batch, for each model, attack
and eps, crafts adversaries with :mod:`lit_modules.robustness.attacks` against that model (white-box, true
labels) and updates one :class:`~lit_modules.robustness.severity.FoolingSeverity` (synced across devices). The
attacks, by name from the attack registry (:func:`~lit_modules.robustness.attacks.make_attack`): ``fgsm``,
``ifgsm``, ``pgd`` (random start), ``mifgsm``, ``rfgsm``, and ``noise``, the control: a random sign pattern of the
same Linf (and, before clipping, L2) norm as FGSM's step, ``x + eps * sign(N(0, I))``; and ``uap``.

At the end of the test it writes into the run folder ``severity_report.md`` and ``severity_report.csv`` (one row
per model x attack x eps: clean accuracy, fooling rate, mean LCA height and tree distance of the flips, the
severity-weighted fooling rate, the true class's rank after the attack and its confidence drop, the LCA height
of the model's own mistakes, and the histogram of flip heights), logs ``test/<model>/<attack>/eps<eps>/<metric>``
and draws one histogram per attack (``images/severity_hist_<attack>.png``).

    uv run cvlab run experiments/severity/fashion_mnist/pipeline.yaml   # train the four nets, then the report

Needs ``Trainer(inference_mode=False)`` (the attacks take input gradients).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn

from cvlab.errors import CvlabError
from lit_modules.robustness.attacks import Attack, check_attack_names, check_eps, make_attack, sign_noise
from lit_modules.robustness.hierarchy import load_hierarchy
from lit_modules.robustness.severity import FoolingSeverity
from lit_modules.teacher import TeacherArg

AttackName = Literal["fgsm", "ifgsm", "pgd", "mifgsm", "rfgsm", "noise", "uap"]
__all__ = ["SeverityReport", "apply_uap", "read_uap", "severity_attacks", "sign_noise"]


def read_uap(path: str | Path) -> tuple[list[float], Tensor]:
    """``(budgets, v (E, C, H, W))`` from a :class:`lit_modules.robustness.UniversalPerturbation` checkpoint
    (``cvlab fit`` of ``experiments/data_impressions/*/uap_*.yaml``), read weights-only."""
    from lit_modules.teacher import read_checkpoint

    state = read_checkpoint(path).get("state_dict", {})
    if "w" not in state or "eps" not in state:
        raise CvlabError(f"{path} is not a UniversalPerturbation checkpoint (no 'w' / 'eps' in its state_dict)")
    eps = state["eps"].float()
    return [float(e) for e in eps], eps.view(-1, 1, 1, 1) * state["w"].float().clamp(-1, 1)


def apply_uap(x: Tensor, v: Tensor, eps: float) -> Tensor:
    """One universal perturbation ``v (C, H, W)`` on every image of ``x (B, C, H, W)``: ``x + P(v)`` inside the Linf
    ball of ``eps`` and [0, 1] (the projection the perturbation was learned under)."""
    from lit_modules.robustness.uap_objective import project_linf_box

    return x + project_linf_box(v.to(x.device, x.dtype), x, eps)


def severity_attacks(names: list[str], eps: float, steps: int, generator: torch.Generator | None) -> dict[str, Attack]:
    """The report's attacks by name from the registry (:func:`~lit_modules.robustness.attacks.make_attack`), the
    budget bound: ``steps`` for the iterative ones, ``generator`` for PGD's start and the noise control."""
    return {a: make_attack(a, eps, steps=steps, generator=generator) for a in names}


COLUMNS = ["model", "attack", "eps", "images", "clean_accuracy", "adv_accuracy", "fooling_rate", "severity_lca",
           "severity_distance", "weighted_fooling_rate", "rank_after", "confidence_drop", "mistake_rate",
           "mistake_lca", "hist_lca"]
#: the columns also logged as ``test/<model>/<attack>/eps<eps>/<column>``
LOGGED = ("fooling_rate", "adv_accuracy", "severity_lca", "weighted_fooling_rate", "confidence_drop")


class SeverityReport(L.LightningModule):
    """Attacks x models x eps -> severity table, CSV, histograms.

    Args:
        models: ``{name: checkpoint path or teacher spec}`` (anything :func:`lit_modules.load_teacher` reads: cvlab
            checkpoints, TorchScript, a torchvision/timm state dict with ``arch``, ``num_classes``, ``mean``, ``std``).
        hierarchy: ``mnist`` / ``fashion_mnist`` (shipped), ``cifar100``, ``wordnet:<data.noun>``, or a YAML/JSON
            tree (see :func:`lit_modules.robustness.hierarchy.load_hierarchy`).
        classes: class names (or WordNet ids) in label order, for a file or WordNet hierarchy; ``None`` takes the
            datamodule's ``class_names`` (e.g. ImageNet's wnids from its folders) when the run starts.
        hierarchy_data_dir: the data root holding ``cifar-100-python/``, for ``cifar100``.
        attacks: which attacks to run (``noise``: the random control; ``uap``: a universal perturbation learned per
            model by :class:`lit_modules.robustness.UniversalPerturbation`, from ``uaps``).
        uaps: ``{model name: UniversalPerturbation checkpoint}`` for the ``uap`` attack; the checkpoint must hold a
            perturbation for every report ``eps`` (its ``budgets``).
        eps: Linf budgets in [0, 1] pixel units.
        steps: steps of I-FGSM, PGD and MI-FGSM (step eps / steps; PGD's 2.5 eps / steps).
        seed: seeds PGD's random start and the noise control.
    """

    def __init__(
        self,
        models: dict[str, TeacherArg],
        hierarchy: str = "fashion_mnist",
        classes: list[str] | None = None,
        hierarchy_data_dir: str | None = None,
        attacks: list[AttackName] | None = None,
        uaps: dict[str, str] | None = None,
        eps: list[float] | None = None,
        steps: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not models:
            raise CvlabError("SeverityReport needs models: {name: checkpoint path}")
        self.attack_names = list(attacks or ["fgsm", "ifgsm", "pgd", "mifgsm", "noise"])
        check_attack_names(self.attack_names, extra=("uap",))
        missing = [m for m in models if "uap" in self.attack_names and m not in (uaps or {})]
        if missing:
            raise CvlabError(f"attack 'uap' needs a UniversalPerturbation checkpoint per model: give "
                             f"--model.init_args.uaps {{{missing[0]}: .../checkpoints/last.ckpt, ...}} "
                             f"(missing: {missing})")
        self._crafted = [a for a in self.attack_names if a != "uap"]  # built from the registry per eps
        self.eps = [float(e) for e in (eps or [0.05, 0.1, 0.2])]
        for e in self.eps:
            check_eps(e)
        self.nets = nn.ModuleDict()  # filled in setup (the checkpoints are read once, on every rank)
        self.uap_tables: dict[str, Tensor] = {}  # model -> (len(eps), C, H, W), filled in setup
        self.metrics = nn.ModuleDict()
        self.hier = None
        if classes is not None or not _needs_classes(hierarchy):
            self._build_hierarchy(classes)

    def _build_hierarchy(self, classes: list[str] | None) -> None:
        self.hier = load_hierarchy(self.hparams.hierarchy, classes, self.hparams.hierarchy_data_dir)
        self.metrics.update({
            self._key(m, a, i): FoolingSeverity(self.hier, validate_args=False)
            for m in self.hparams.models for a in self.attack_names for i in range(len(self.eps))
        })

    @staticmethod
    def _key(model: str, attack: str, i: int) -> str:
        return f"{model}__{attack}__{i}"

    def setup(self, stage: str) -> None:
        from lit_modules.teacher import load_teacher

        if self.hier is None:
            names = getattr(getattr(self._trainer, "datamodule", None), "class_names", None)
            if names is None:
                raise CvlabError(f"hierarchy {self.hparams.hierarchy!r} needs the class names in label order: set "
                                 "--model.init_args.classes or use a datamodule with class_names "
                                 "(e.g. ImageNetDataModule)")
            self._build_hierarchy(list(names))
        if not len(self.nets):
            for name, path in self.hparams.models.items():
                net = load_teacher(path)
                if self.hier.num_classes != _num_classes(net):
                    raise CvlabError(f"model {name!r} has {_num_classes(net)} outputs, the hierarchy "
                                     f"{self.hparams.hierarchy!r} {self.hier.num_classes} classes")
                self.nets[name] = net
            if "uap" in self.attack_names:
                for name in self.hparams.models:
                    self.uap_tables[name] = self._uaps_for(name)

    def _uaps_for(self, name: str) -> Tensor:
        """The model's universal perturbations in the report's eps order ``(len(eps), C, H, W)``."""
        path = self.hparams.uaps[name]
        budgets, v = read_uap(path)
        rows = []
        for e in self.eps:
            hit = [i for i, b in enumerate(budgets) if abs(b - e) < 1e-6]
            if not hit:
                raise CvlabError(f"UAP checkpoint {path} for {name!r} has budgets {budgets}, the report asks eps {e}: "
                                 "learn it with the report's eps as its budgets")
            rows.append(v[hit[0]])
        table = torch.stack(rows)
        shape = getattr(self.nets[name], "input_shape", None)
        if shape is not None and tuple(table.shape[1:]) != tuple(shape):
            raise CvlabError(f"UAP checkpoint {path} is {tuple(table.shape[1:])}, model {name!r} takes {tuple(shape)}")
        return table

    def on_test_epoch_start(self) -> None:
        if torch.is_inference_mode_enabled():
            raise CvlabError("the severity report attacks the models: run with --trainer.inference_mode=false")
        self.generator = torch.Generator(device=self.device).manual_seed(self.hparams.seed + 7919 * self.global_rank)

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        for name, net in self.nets.items():
            with torch.no_grad():
                clean = net(x)  # (B, K)
            for i, eps in enumerate(self.eps):
                suite = severity_attacks(self._crafted, eps, self.hparams.steps, self.generator)
                for a in self.attack_names:
                    x_adv = apply_uap(x, self.uap_tables[name][i], eps) if a == "uap" else suite[a](net, x, y)
                    with torch.no_grad():
                        adv = net(x_adv)
                    self.metrics[self._key(name, a, i)].update(clean, adv, y)

    def on_test_epoch_end(self) -> None:
        rows = []
        for name in self.nets:
            for a in self.attack_names:
                for i, eps in enumerate(self.eps):
                    out = self.metrics[self._key(name, a, i)].compute()  # synced across devices
                    row = {"model": name, "attack": a, "eps": eps, "images": int(out["count"])}
                    row.update({k: float(out[k]) for k in COLUMNS[4:-1]})
                    row["hist_lca"] = [int(v) for v in out["hist_lca"].tolist()]
                    rows.append(row)
                    for k in LOGGED:
                        self.log(f"test/{name}/{a}/eps{eps:g}/{k}", row[k], sync_dist=False)
            self.log(f"test/{name}/clean_accuracy", rows[-1]["clean_accuracy"], sync_dist=False)
            self.log(f"test/{name}/mistake_lca", rows[-1]["mistake_lca"], sync_dist=False)
        if self.trainer.is_global_zero:
            folder = Path(self.trainer.default_root_dir)
            write_report(rows, folder, self.hparams.hierarchy, self.hier.height)
            plot_histograms(rows, folder / "images", self.hier.height, self.trainer)
        self.rows = rows


def _needs_classes(hierarchy: str) -> bool:
    """A WordNet or file hierarchy is read against the class names in label order."""
    return hierarchy.startswith("wordnet:") or Path(hierarchy).suffix in (".yaml", ".yml", ".json")


def _num_classes(net: nn.Module) -> int:
    k = getattr(net, "num_classes", None)
    if k is None:
        raise CvlabError(
            "cannot tell the model's number of classes; give a cvlab checkpoint or a spec with num_classes")
    return int(k)


def _fmt(v: float) -> str:
    return "-" if isinstance(v, float) and math.isnan(v) else f"{v:.3f}"


def write_report(rows: list[dict], folder: Path, hierarchy: str, height: int) -> None:
    """``severity_report.csv`` (every column) and ``severity_report.md`` (the paper-style table)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "severity_report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "hist_lca": " ".join(map(str, r["hist_lca"]))})
    head = ["model", "attack", "eps", "clean acc", "FR", "LCA height (fooled)", "distance (fooled)", "SWFR",
            "rank after", "conf drop", "LCA height (own mistakes)", f"flips at height 1..{height}"]
    lines = [f"Severity report: hierarchy `{hierarchy}` (largest LCA height {height}), {rows[0]['images']} images",
             "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["model"], r["attack"], f"{r['eps']:g}", _fmt(r["clean_accuracy"]), _fmt(r["fooling_rate"]),
                 _fmt(r["severity_lca"]), _fmt(r["severity_distance"]), _fmt(r["weighted_fooling_rate"]),
                 _fmt(r["rank_after"]), _fmt(r["confidence_drop"]), _fmt(r["mistake_lca"]),
                 " / ".join(map(str, r["hist_lca"][1:]))]
        lines.append("| " + " | ".join(cells) + " |")
    (folder / "severity_report.md").write_text("\n".join(lines) + "\n")


def plot_histograms(rows: list[dict], folder: Path, height: int, trainer: L.Trainer | None = None) -> None:
    """Per attack: the share of fooled images at each LCA height, one bar group per model, one panel per eps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    models = list(dict.fromkeys(r["model"] for r in rows))
    eps = list(dict.fromkeys(r["eps"] for r in rows))
    width = 0.8 / max(len(models), 1)
    for attack in dict.fromkeys(r["attack"] for r in rows):
        fig, axes = plt.subplots(1, len(eps), figsize=(3.2 * len(eps), 3), squeeze=False, sharey=True)
        for ax, e in zip(axes[0], eps):
            for j, m in enumerate(models):
                r = next(r for r in rows if r["attack"] == attack and r["eps"] == e and r["model"] == m)
                h = torch.tensor(r["hist_lca"][1:], dtype=torch.float64)
                share = (h / h.sum().clamp_min(1)).tolist()
                ax.bar([k + 1 + (j - (len(models) - 1) / 2) * width for k in range(height)], share, width,
                       label=f"{m} (FR {r['fooling_rate']:.2f})")
            ax.set_title(f"{attack}, eps {e:g}", fontsize=9)
            ax.set_xlabel("LCA height of the flip")
            ax.set_xticks(range(1, height + 1))
            ax.legend(fontsize=6)
        axes[0][0].set_ylabel("share of fooled images")
        fig.tight_layout()
        path = folder / f"severity_hist_{attack}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        for logger in (trainer.loggers if trainer is not None else []):
            if type(logger).__name__ == "WandbLogger":
                logger.log_image(key=f"test/severity_hist_{attack}", images=[str(path)])
