"""Severity-aware fooling metrics: how bad is a flip? (after Mopuri, Shaj, Babu, "Adversarial Fooling Beyond
'Flipping the Label'", CVPR Workshops 2020, arXiv 2004.12771).

The fooling rate counts a dog breed swapped for another as much as a dog turned into a truck. The paper measures
the *severity* of fooling; its exact formulas are not public in a form we could read, so the operationalisation
here is ours, grounded in a class hierarchy (:class:`~lit_modules.robustness.hierarchy.ClassHierarchy`), as in
arXiv 2108.11785. For clean predictions ``c``, adversarial predictions ``a`` and true labels ``y`` over ``N``
images, with ``H`` the hierarchy's largest LCA height:

- fooling rate ``FR = mean[a != c]`` (a flip of the model's own prediction, right or wrong);
- severity of a flip: ``lca_height(c, a)`` (levels climbed from the deeper class to the lowest common
  ancestor) and ``distance(c, a)`` (tree edges); *mean severity* = their mean over the fooled images;
- severity-weighted fooling rate ``SWFR = mean[lca_height(c, a)] / H``: a flip across the root counts 1, a flip to
  a sibling ``1 / H``, no flip 0 (so ``SWFR <= FR``, with equality when every flip crosses the root);
- the histogram of ``lca_height(c, a)`` over the fooled images (bins ``1..H``);
- rank of the true class after the attack (1 = top; ties ranked optimistically), and before it;
- confidence drop ``mean[p_clean(y) - p_adv(y)]`` (softmax probabilities of the true class);
- the same severities for the model's own mistakes, ``c`` against ``y`` (``mistake_*``), so that an attack's
  severity is read against how severe the model's natural errors are.

:class:`FoolingSeverity` is a torchmetrics ``Metric``: every state is a count or a sum with
``dist_reduce_fx="sum"``, so values synced over devices equal one process's. ``update`` makes no host sync (a
class index outside the tree is caught from the logits' width; the labels' range is checked with one sync only
under ``validate_args=True``, the torchmetrics convention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from lit_modules.robustness.hierarchy import ClassHierarchy, HierarchyError


def true_class_rank(logits: Tensor, y: Tensor) -> Tensor:
    """Rank of ``y`` in each row of ``logits`` ``(B, K)``: 1 + the number of classes scored strictly higher. ``(B,)``"""
    return (logits > logits.gather(1, y[:, None])).sum(1) + 1


def true_class_confidence(logits: Tensor, y: Tensor) -> Tensor:
    """Softmax probability of ``y`` ``(B,)``, computed in fp32."""
    return F.softmax(logits.float(), dim=-1).gather(1, y[:, None]).squeeze(1)


def pair_severity(matrix: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``matrix[a, b]`` for class index vectors ``a, b`` ``(B,)``: a batched lookup in a ``(K, K)`` table."""
    return matrix[a, b]


class FoolingSeverity(Metric):
    """Fooling rate, severity of the flips and of the model's own mistakes, rank and confidence of the true class.

    ``update(clean_logits (B, K), adv_logits (B, K), target (B,))``; ``compute()`` returns a dict of 0-dim
    tensors (``fooling_rate``, ``severity_lca``, ``severity_distance``, ``weighted_fooling_rate``,
    ``rank_before``, ``rank_after``, ``confidence_drop``, ``mistake_rate``, ``mistake_lca``,
    ``mistake_distance``, ``weighted_mistake_rate``, ``clean_accuracy``, ``adv_accuracy``, ``count``) and the
    histograms ``hist_lca`` / ``hist_mistake_lca`` ``(H + 1,)`` (bin ``h``: images whose flip has LCA height ``h``;
    bin 0 counts the images not flipped). Mean severities of an empty set are NaN.
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, hierarchy: ClassHierarchy, validate_args: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes = hierarchy.num_classes
        self.height = max(hierarchy.height, 1)
        self.validate_args = validate_args
        self.register_buffer("lca_table", hierarchy.lca_height.clone(), persistent=False)  # (K, K)
        self.register_buffer("distance_table", hierarchy.distance.clone(), persistent=False)  # (K, K)
        zero = torch.tensor(0.0, dtype=torch.float64)
        for name in ("count", "fooled", "lca_sum", "distance_sum", "rank_before_sum", "rank_after_sum",
                     "confidence_drop_sum", "mistakes", "mistake_lca_sum", "mistake_distance_sum", "adv_wrong"):
            self.add_state(name, default=zero.clone(), dist_reduce_fx="sum")
        self.add_state("hist_lca", default=torch.zeros(self.height + 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("hist_mistake_lca", default=torch.zeros(self.height + 1, dtype=torch.float64),
                       dist_reduce_fx="sum")

    def _check(self, clean_logits: Tensor, adv_logits: Tensor, target: Tensor) -> None:
        k = self.num_classes
        for name, t in (("clean_logits", clean_logits), ("adv_logits", adv_logits)):
            if t.ndim != 2 or t.shape[1] != k or t.shape[0] != target.shape[0]:
                raise HierarchyError(
                    f"{name} must be (B, {k}) for a hierarchy of {k} classes and {target.shape[0]} labels, got "
                    f"{tuple(t.shape)}: predictions would index classes outside the tree"
                )
        if self.validate_args and target.numel():
            lo, hi = int(target.min()), int(target.max())  # one host sync, only with validate_args
            if lo < 0 or hi >= k:
                raise HierarchyError(f"labels must be class indices in [0, {k - 1}] of the hierarchy, got [{lo}, {hi}]")

    def update(self, clean_logits: Tensor, adv_logits: Tensor, target: Tensor) -> None:
        self._check(clean_logits, adv_logits, target)
        clean_logits, adv_logits = clean_logits.detach(), adv_logits.detach()
        c, a = clean_logits.argmax(-1), adv_logits.argmax(-1)  # (B,)
        fool_lca = pair_severity(self.lca_table, c, a)  # (B,), 0 where not fooled
        mistake_lca = pair_severity(self.lca_table, c, target)  # (B,), 0 where right
        f64 = torch.float64
        self.count += target.shape[0]
        self.fooled += (a != c).sum().to(f64)
        self.adv_wrong += (a != target).sum().to(f64)
        self.lca_sum += fool_lca.sum().to(f64)
        self.distance_sum += pair_severity(self.distance_table, c, a).sum().to(f64)
        self.rank_before_sum += true_class_rank(clean_logits, target).sum().to(f64)
        self.rank_after_sum += true_class_rank(adv_logits, target).sum().to(f64)
        drop = true_class_confidence(clean_logits, target) - true_class_confidence(adv_logits, target)
        self.confidence_drop_sum += drop.sum().to(f64)
        self.mistakes += (c != target).sum().to(f64)
        self.mistake_lca_sum += mistake_lca.sum().to(f64)
        self.mistake_distance_sum += pair_severity(self.distance_table, c, target).sum().to(f64)
        self.hist_lca += torch.bincount(fool_lca, minlength=self.height + 1).to(f64)
        self.hist_mistake_lca += torch.bincount(mistake_lca, minlength=self.height + 1).to(f64)

    def compute(self) -> dict[str, Tensor]:
        n = self.count.clamp_min(1)
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.count.device)

        def mean_over(total: Tensor, k: Tensor) -> Tensor:
            return torch.where(k > 0, total / k.clamp_min(1), nan)

        return {
            "count": self.count,
            "clean_accuracy": 1 - self.mistakes / n,
            "adv_accuracy": 1 - self.adv_wrong / n,
            "fooling_rate": self.fooled / n,
            "severity_lca": mean_over(self.lca_sum, self.fooled),
            "severity_distance": mean_over(self.distance_sum, self.fooled),
            "weighted_fooling_rate": self.lca_sum / n / self.height,
            "rank_before": self.rank_before_sum / n,
            "rank_after": self.rank_after_sum / n,
            "confidence_drop": self.confidence_drop_sum / n,
            "mistake_rate": self.mistakes / n,
            "mistake_lca": mean_over(self.mistake_lca_sum, self.mistakes),
            "mistake_distance": mean_over(self.mistake_distance_sum, self.mistakes),
            "weighted_mistake_rate": self.mistake_lca_sum / n / self.height,
            "hist_lca": self.hist_lca,
            "hist_mistake_lca": self.hist_mistake_lca,
        }
