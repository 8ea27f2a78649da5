"""Long-tailed subsets of balanced datasets (CIFAR-10-LT / CIFAR-100-LT).

The exponential profile of Cui et al. (2019, "Class-Balanced Loss") and Cao et al. (2019, LDAM-DRW):
class ``k`` of ``K`` keeps ``n_k = floor(n_max * (1 / imbalance_factor) ** (k / (K - 1)))`` training
examples, so class 0 keeps ``n_max`` and class ``K - 1`` keeps ``n_max / imbalance_factor``. The kept
examples of a class are its first ``n_k`` in file order, which makes the subset deterministic and
identical to the reference implementations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def long_tail_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """Per-class training counts of the exponential long-tail profile.

    ``long_tail_counts(5000, 10, 100)`` is ``[5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]``.

    Args:
        n_max: examples kept of class 0 (the head).
        num_classes: ``K``.
        imbalance_factor: ``n_max / n_min`` (>= 1; 1 keeps every class at ``n_max``).
    """
    if n_max < 0:
        raise ValueError(f"n_max must be >= 0, got {n_max}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not imbalance_factor >= 1.0:  # also rejects NaN
        raise ValueError(f"imbalance_factor must be >= 1, got {imbalance_factor}")
    if num_classes == 1:
        return [int(n_max)]
    ratio = 1.0 / imbalance_factor
    # same arithmetic as the reference code (int() of a float product), so counts match exactly
    return [int(n_max * ratio ** (k / (num_classes - 1.0))) for k in range(num_classes)]


def long_tail_indices(labels: Tensor, counts: Sequence[int]) -> Tensor:
    """Indices of the first ``counts[c]`` examples of every class ``c``, in file order.

    A class with fewer than ``counts[c]`` examples keeps all of them. Vectorised: one stable sort by
    label, a rank within each class, one comparison; no loop over samples or classes.

    Args:
        labels: int labels ``(N,)`` in ``[0, len(counts))``.
        counts: how many examples of each class to keep.

    Returns:
        int64 indices into ``labels``, ascending.
    """
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    limit = torch.as_tensor(list(counts), dtype=torch.long)
    n, k = labels.numel(), limit.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.long)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= k:
        raise ValueError(f"labels must lie in [0, {k}) for {k} class counts, found [{lo}, {hi}]")
    order = torch.sort(labels, stable=True).indices  # grouped by class, file order within a class
    sorted_labels = labels[order]
    sizes = torch.bincount(labels, minlength=k)
    starts = torch.cumsum(sizes, 0) - sizes  # where each class begins in the sorted order
    rank = torch.arange(n) - starts[sorted_labels]  # position of each example within its class
    keep = rank < limit[sorted_labels]
    return order[keep].sort().values
