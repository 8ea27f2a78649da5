"""Dataset Condensation with gradient matching: the system (:class:`DatasetCondensation` in ``dc``), the
matching math in ``gradient_matching``, the networks with their input normalisation in ``pixel_net``, and
the evaluation protocol: the :class:`CondensationEvaluation` callback (``evaluation``) over the recipe and
the random / herding baselines (``dc_eval``)."""

from lit_modules.condensation.dc import DatasetCondensation, load_condensed
from lit_modules.condensation.evaluation import CondensationEvaluation

__all__ = ["CondensationEvaluation", "DatasetCondensation", "load_condensed"]
