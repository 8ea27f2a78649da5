"""One rule for deriving seeds: a run's seed and a counter (step, trial, batch, network) give the seed of one
independent random stream, the same on every device and after a resume.

Ground floor: imports nothing of cvlab.
"""

from __future__ import annotations

#: the multiplier of :func:`mix_seed`: a prime larger than any step, trial or batch count a run reaches, so that
#: ``(seed, k)`` pairs map to distinct seeds
SEED_STRIDE = 1_000_003
_MODULUS = 2**61 - 1  # a Mersenne prime: folded seeds stay in torch.Generator's range


def mix_seed(seed: int, k: int) -> int:
    """The seed of stream ``k`` of a run seeded ``seed``: ``seed * 1_000_003 + k``."""
    return int(seed) * SEED_STRIDE + int(k)


def fold_seed(*keys: int) -> int:
    """One seed from several integers (e.g. seed, epoch, slot), order-sensitive, in ``[0, 2**61 - 1)``."""
    h = 0
    for k in keys:
        h = (h * SEED_STRIDE + int(k)) % _MODULUS
    return h
