"""LRA's retention measures: what the student keeps of what it learned from earlier generator distributions.

Patel, Mopuri, Qiu, CVPR 2023 (https://arxiv.org/abs/2302.14290) argue that adversarial data-free KD forgets: the
generator keeps moving to where student and teacher disagree, and the student's accuracy on what it learned
earlier falls. Two measures, both on a curve of evaluations over training:

- :func:`accuracy_drops`: the number, total and largest fall of an accuracy curve (the paper's accuracy-drop
  curve: every evaluation below the one before it is a drop);
- :class:`RetentionProbe`: a fixed probe of earlier generated batches, each kept with the teacher's labels on it
  at the end of a chosen epoch, and the student's accuracy on each (:func:`probe_accuracy`, agreement with those
  labels) at every later evaluation; :func:`probe_forgetting` is the mean fall of each probe from its best.

:func:`retention_figure` draws the curves of one or more runs (the validation accuracy and the mean probe
accuracy per run) as an image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cvlab.errors import CvlabError

__all__ = ["Drops", "RetentionProbe", "accuracy_drops", "probe_accuracy", "probe_forgetting", "retention_figure"]


@dataclass(frozen=True)
class Drops:
    """The falls of an accuracy curve: ``count`` drops, summing to ``total``, the largest ``largest`` (in the
    curve's units: an accuracy fraction, so 0.012 = 1.2 points)."""

    count: int
    total: float
    largest: float


def accuracy_drops(curve: Sequence[float]) -> Drops:
    """Every point below its predecessor is a drop of ``previous - point`` (an equal value is no drop).

    ``accuracy_drops([0.5, 0.7, 0.65, 0.8, 0.72, 0.72, 0.9, 0.6])`` is 3 drops, total 0.43, largest 0.30.
    """
    falls = [a - b for a, b in zip(curve, curve[1:]) if b < a]
    return Drops(len(falls), float(sum(falls)), float(max(falls, default=0.0)))


def probe_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """The student's accuracy on each probe: ``logits (P, n, K)``, the teacher's ``labels (P, n)`` -> ``(P,)``,
    the fraction of each probe's ``n`` images whose arg-max class is the label (ties: the lowest class)."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise CvlabError(f"probe_accuracy takes logits (P, n, K) and labels (P, n); got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    return (logits.argmax(-1) == labels).float().mean(-1)


def probe_forgetting(curves: Sequence[Sequence[float]]) -> float:
    """The mean over probes of (best accuracy on the probe so far - its last accuracy); 0 without probes.

    ``probe_forgetting([[0.9, 0.7, 0.8], [0.6, 0.6]])`` is ``((0.9 - 0.8) + 0) / 2 = 0.05``.
    """
    curves = [c for c in curves if len(c)]
    if not curves:
        return 0.0
    return float(sum(max(c) - c[-1] for c in curves) / len(curves))


class RetentionProbe:
    """A bounded set of generated batches kept at the end of the chosen ``epochs``, each with the teacher's labels,
    and the student's accuracy on each at every evaluation since it was taken.

    ``images`` is ``(P, n, C, H, W)`` and ``labels`` ``(P, n)`` once the first probe is taken (``P`` grows up to
    ``len(epochs)``); ``acc`` holds one row per evaluation: the accuracy on each probe taken by then (row ``i`` has
    as many entries as probes existed at evaluation ``i``). ``state_dict`` holds plain tensors, ints and floats
    (a ``weights_only`` checkpoint loads it).
    """

    def __init__(self, epochs: Sequence[int] = ()) -> None:
        if any(e < 0 for e in epochs):
            raise CvlabError(f"probe_epochs must be >= 0; got {list(epochs)}")
        self.epochs = sorted(set(int(e) for e in epochs))
        self.taken: list[int] = []  # the epochs whose batch is in the probe, in the order taken
        self.images: Tensor | None = None
        self.labels: Tensor | None = None
        self.acc: list[list[float]] = []

    def __len__(self) -> int:
        return len(self.taken)

    def wants(self, epoch: int) -> bool:
        """Whether the batch of the end of ``epoch`` joins the probe."""
        return epoch in self.epochs and epoch not in self.taken

    def add(self, epoch: int, images: Tensor, labels: Tensor) -> None:
        """Keep ``images (n, C, H, W)`` with the teacher's ``labels (n,)`` as the probe of ``epoch``."""
        if images.shape[0] != labels.shape[0]:
            raise CvlabError(f"a probe needs one label per image; got {images.shape[0]} images, "
                             f"{labels.shape[0]} labels")
        if self.images is not None and images.shape != self.images.shape[1:]:
            raise CvlabError(f"probes hold {tuple(self.images.shape[1:])}, got a batch of {tuple(images.shape)}")
        x, y = images.detach()[None], labels.detach().long()[None]
        self.images = x if self.images is None else torch.cat([self.images, x])
        self.labels = y if self.labels is None else torch.cat([self.labels, y])
        self.taken.append(int(epoch))

    def record(self, acc: Sequence[float]) -> None:
        """Append one evaluation: the accuracy on each probe taken so far (``len(self)`` values)."""
        if len(acc) != len(self):
            raise CvlabError(f"{len(self)} probes but {len(acc)} accuracies")
        self.acc.append([float(a) for a in acc])

    def curves(self) -> list[list[float]]:
        """The accuracy curve of each probe (from the evaluation that first saw it)."""
        return [[row[p] for row in self.acc if len(row) > p] for p in range(len(self))]

    def mean_curve(self) -> list[float | None]:
        """The mean probe accuracy of each evaluation (``None`` before the first probe)."""
        return [sum(row) / len(row) if row else None for row in self.acc]

    def to(self, device: torch.device) -> RetentionProbe:
        if self.images is not None:
            self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": list(self.epochs), "taken": list(self.taken), "acc": [list(r) for r in self.acc],
                "images": None if self.images is None else self.images.detach().cpu(),
                "labels": None if self.labels is None else self.labels.detach().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.taken = [int(e) for e in state["taken"]]
        self.acc = [[float(a) for a in row] for row in state["acc"]]
        self.images, self.labels = state["images"], state["labels"]


def retention_figure(runs: Mapping[str, Mapping[str, Any]], title: str = "") -> Tensor:
    """The retention curves of one or more runs as a ``(1, 3, H, W)`` image in [0, 1].

    ``runs`` maps a label (an arm, ``lra`` / ``baseline``) to its retention summary (``retention_curve.json``:
    ``generator_step``, ``acc`` and, with a probe, ``probe_acc``, the per-evaluation rows of
    :attr:`RetentionProbe.acc`). Per run, in one colour: the validation accuracy (solid), the mean probe accuracy
    (dashed; its composition grows as probes are added) and each probe's own curve (thin: a fall is forgetting)
    against generator steps.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=100)
    for i, (label, run) in enumerate(runs.items()):
        steps, colour = list(run["generator_step"]), f"C{i}"
        ax.plot(steps, run["acc"], color=colour, marker=".", label=f"{label}: validation")
        rows = run.get("probe_acc") or []
        pts = [(s, sum(r) / len(r)) for s, r in zip(steps, rows) if r]
        if pts:
            ax.plot(*zip(*pts), color=colour, linestyle="--", label=f"{label}: probe of earlier batches (mean)")
        for p in range(max((len(r) for r in rows), default=0)):  # each probe from its first evaluation, thin
            ax.plot(*zip(*[(s, r[p]) for s, r in zip(steps, rows) if len(r) > p]), color=colour, linewidth=0.6,
                    alpha=0.35)
    ax.set_xlabel("generator step")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return torch.from_numpy(rgba).permute(2, 0, 1).float().div(255).unsqueeze(0)
