"""Dataset Condensation with gradient matching (:class:`DatasetCondensation` in ``dc``), the matching
math in ``gradient_matching`` and the evaluation protocol (random / herding baselines, batched
evaluation nets) in ``dc_eval``."""

from lit_modules.condensation.dc import DatasetCondensation, load_condensed

__all__ = ["DatasetCondensation", "load_condensed"]
