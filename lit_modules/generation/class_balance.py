"""The class-balancing regulariser of CBGAN (Rangwani, Mopuri, Babu, "Class Balancing GAN with a
Classifier in the Loop", UAI 2021, https://arxiv.org/abs/2106.09402), as pure functions plus a state.

A frozen classifier scores every generated batch; ``pbar`` is its batch-mean softmax ``(K,)``. The
generator minimises

    L_reg = sum_k w_k pbar_k log pbar_k                        (paper eq. 4; added as lambda * L_reg)

i.e. it maximises an entropy of ``pbar`` in which class ``k`` counts ``w_k`` times. The weights come from
the *effective* number of samples the generator has produced of each class, with exponential forgetting:

    w_k = (1 / N_k) / sum_j (1 / N_j) * K                      (normalised to sum to K)
    every T generator steps:  N_k <- alpha N_k + (1 - alpha) n_k,  then N_k <- max(N_k, 1)

where ``n_k`` counts the generated samples the classifier put in class ``k`` (hard argmax) since the last
update. Settings from the public code (val-iisc/class-balancing-gan): ``N_k`` starts at 50, T = 2000,
alpha 0.5 (0.995 on iNaturalist), and the first period's ``n_k`` starts at 512 a class (its ``init_size``;
later periods start at 0), so the first update is ``N_k <- alpha 50 + (1 - alpha)(512 + n_k)``.
A class the generator under-produces gets a small ``N_k``, a large weight, and the gradient of ``L_reg``
pushes ``pbar`` towards it (tested on a toy case).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def class_weights(effective_counts: Tensor) -> Tensor:
    """``w_k = (1 / N_k) / sum_j (1 / N_j) * K``: ``(K,)`` positive counts -> ``(K,)`` weights summing to K.

    ``class_weights(tensor([1., 3.]))`` is ``[1.5, 0.5]``.
    """
    inv = 1.0 / effective_counts.double()
    return (inv / inv.sum() * effective_counts.numel()).to(effective_counts.dtype)


def class_balance_loss(probs: Tensor, weights: Tensor, global_pbar: Tensor | None = None, eps: float = 1e-12) -> Tensor:
    """``sum_k w_k pbar_k log pbar_k`` with ``pbar = probs.mean(0)``: the term the generator minimises.

    Args:
        probs: ``(B, K)`` softmax of the classifier on a generated batch.
        weights: ``(K,)`` class weights (:func:`class_weights`), treated as constants.
        global_pbar: under DDP, ``pbar`` of the *global* batch (the mean of every device's ``pbar``,
            detached). The value is then the global term and the gradient its linearisation at
            ``global_pbar`` restricted to this device's samples, ``sum_k w_k (log P_k + 1) dpbar_k``, so that
            averaging gradients over devices gives exactly the global batch's gradient.
        eps: floor inside the log (a class with ``pbar_k = 0`` contributes 0, as ``x log x -> 0``).

    Returns:
        a scalar; ``-log K`` for uniform ``pbar`` and unit weights, 0 for a one-hot ``pbar``.
    """
    w = weights.detach()
    pbar = probs.mean(0)  # (K,)
    if global_pbar is None:
        return (w * pbar * torch.log(pbar.clamp_min(eps))).sum()
    P = global_pbar.detach()
    log_p = torch.log(P.clamp_min(eps))
    return (w * P * log_p).sum() + (w * (log_p + 1) * (pbar - pbar.detach())).sum()


def hard_counts(logits: Tensor, num_classes: int) -> Tensor:
    """``(B, K)`` logits -> ``(K,)`` float counts of the argmax class (no host sync)."""
    dtype = logits.dtype if logits.is_floating_point() else torch.float32
    return torch.bincount(logits.argmax(-1), minlength=num_classes).to(dtype)


def update_effective_counts(effective: Tensor, observed: Tensor, alpha: float, floor: float = 1.0) -> Tensor:
    """``max(alpha * N + (1 - alpha) * n, floor)``: the exponential-forgetting update of the effective counts.

    ``update_effective_counts(tensor([50., 50., 50.]), tensor([90., 10., 0.]), 0.5)`` is ``[70, 30, 25]``.
    """
    return (alpha * effective + (1.0 - alpha) * observed).clamp_min(floor)


class ClassBalanceState(nn.Module):
    """The regulariser's running state; every tensor is a buffer, so it is in the checkpoint and a resumed
    run continues exactly.

    Buffers:
        effective_counts: ``N_k`` ``(K,)``, starts at ``initial_count``.
        pending_counts: ``n_k`` ``(K,)``, argmax counts of generated samples since the last update; starts at
            ``initial_pending_count`` (the first period only).
        steps: generator steps observed (a 0-d int64 tensor).

    Args:
        num_classes: K.
        alpha: forgetting factor of the update (0.5; 0.995 on iNaturalist).
        update_every: generator steps between updates (2000).
        initial_count: starting ``N_k`` (50).
        initial_pending_count: starting ``n_k`` of the first period, every class (512, the public code's
            ``init_size``; 0: the first update sees only generated samples).
    """

    def __init__(self, num_classes: int, alpha: float = 0.5, update_every: int = 2000, initial_count: float = 50.0,
                 initial_pending_count: float = 512.0) -> None:
        super().__init__()
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        if initial_pending_count < 0:
            raise ValueError(f"initial_pending_count must be >= 0, got {initial_pending_count}")
        self.num_classes, self.alpha, self.update_every = num_classes, float(alpha), int(update_every)
        self.register_buffer("effective_counts", torch.full((num_classes,), float(initial_count)))
        self.register_buffer("pending_counts", torch.full((num_classes,), float(initial_pending_count)))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def weights(self) -> Tensor:
        """``(K,)`` class weights from the current effective counts (sum K)."""
        return class_weights(self.effective_counts)

    @torch.no_grad()
    def observe(self, counts: Tensor) -> None:
        """Add one generator step's ``(K,)`` argmax counts (summed over ranks by the caller under DDP); every
        ``update_every`` steps fold them into the effective counts and start counting afresh."""
        self.pending_counts += counts.to(self.pending_counts)
        self.steps += 1
        # branch-free (no host sync): update = 1 on an update step, else 0
        update = (self.steps % self.update_every == 0).to(self.effective_counts.dtype)
        new = update_effective_counts(self.effective_counts, self.pending_counts, self.alpha)
        self.effective_counts.copy_(update * new + (1 - update) * self.effective_counts)
        self.pending_counts.mul_(1 - update)
