"""Distillation without the training data.

- ``zskd``: Zero-Shot KD's Data Impression synthesis (:class:`DataImpressionSynthesizer`), its math in
  ``data_impressions``;
- ``student``: the student core (:class:`~lit_modules.distillation.student.Student`: network, normalisation, teacher
  handshake, data check, evaluation) shared by KD, LRA, source-free adaptation and class-incremental learning;
- ``kd_student``: the KD student (:class:`KDStudent`) that distils on impressions, arbitrary transfer
  sets or real data; the KD losses in ``kd_loss``;
- ``transfer_set_selection``: the arbitrary transfer sets paper's target-class balancing as a stage
  (:class:`ArbitraryTransferSetSelection`, WACV 2021) that writes the selected set;
- ``lra``: Learning to Retain while Acquiring (:class:`LRA`; ``AdversarialKD`` is its old name), its math in
  ``lra_losses`` and ``lra_update``;
- ``impression_replay``: class-incremental learning replaying Data Impressions of the previous step's network
  (:class:`ClassIncrementalLearner`; Data Impressions, TPAMI 2022), its math in ``class_incremental``;
- ``source_free``: source-free domain adaptation with Data Impressions in place of the source data
  (:class:`SourceFreeAdaptation`: Deep CORAL + SHOT's information maximisation), its math in ``adaptation_losses``.
"""

from lit_modules.distillation.impression_replay import ClassIncrementalLearner
from lit_modules.distillation.kd_student import KDStudent
from lit_modules.distillation.lra import LRA, AdversarialKD
from lit_modules.distillation.source_free import SourceFreeAdaptation
from lit_modules.distillation.transfer_set_selection import ArbitraryTransferSetSelection
from lit_modules.distillation.zskd import DataImpressionSynthesizer

__all__ = ["LRA", "AdversarialKD", "ArbitraryTransferSetSelection", "ClassIncrementalLearner",
           "DataImpressionSynthesizer", "KDStudent", "SourceFreeAdaptation"]
