"""The math of source-free domain adaptation with Data Impressions (pure functions).

Data Impressions (Nayak et al., TPAMI 2022) stand in for the source data of an adaptation method that needs
source samples. We pair them with Deep CORAL (Sun & Saenko, ECCV 2016 workshops, arXiv 1607.01719): align the
second-order statistics of the network's penultimate features on source samples with those on the target, while a
distillation term keeps the source model's decisions on the source samples; plus SHOT's information maximisation
(Liang, Hu, Feng, ICML 2020, arXiv 2002.08546) on the target. Why CORAL: it is the simplest alignment that needs
source *features*, which impressions provide and a source-free method otherwise lacks (SHOT alone, our
``source: null`` ablation, needs no source samples at all, so it would not test the impressions).

- :func:`coral_loss`: ``||C_s - C_t||_F^2 / (4 d^2)`` with ``C`` the unbiased feature covariances ``(d, d)``.
- :func:`information_maximization`: ``mean_i H(p_i) - H(mean_i p_i)`` (confident and diverse target predictions).
"""

from __future__ import annotations

from torch import Tensor


def feature_covariance(f: Tensor) -> Tensor:
    """Unbiased covariance ``(d, d)`` of features ``f (n, d)``, ``n >= 2``."""
    f = f.float()
    centred = f - f.mean(0, keepdim=True)
    return centred.T @ centred / (f.shape[0] - 1)


def coral_loss(source: Tensor, target: Tensor) -> Tensor:
    """Deep CORAL: ``||cov(source) - cov(target)||_F^2 / (4 d^2)`` for features ``(n_s, d)`` and ``(n_t, d)``."""
    d = source.shape[1]
    return (feature_covariance(source) - feature_covariance(target)).square().sum() / (4 * d * d)


def information_maximization(logits: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """SHOT's IM loss on target logits ``(B, K)``: returns ``(loss, entropy, diversity)`` with
    ``entropy = mean_i H(p_i)`` (minimised: confident) and ``diversity = H(mean_i p_i)`` (maximised: every class
    used), ``loss = entropy - diversity``."""
    p = logits.float().softmax(-1)  # (B, K)
    entropy = -(p * (p + eps).log()).sum(-1).mean()
    mean = p.mean(0)  # (K,)
    diversity = -(mean * (mean + eps).log()).sum()
    return entropy - diversity, entropy, diversity
