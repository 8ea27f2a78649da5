"""Robustness: attacks in pixel space (``attacks``), adversarial training with the clean, FGSM-AT, PGD-AT and
Gray-box Adversarial Training regimes (``adversarial_training``), and gray-box evaluation (``gray_box``)."""

from lit_modules.robustness.adversarial_training import AdversarialTrainer, SnapshotBag, SnapshotModel
from lit_modules.robustness.gray_box import GrayBoxEvaluation

__all__ = ["AdversarialTrainer", "GrayBoxEvaluation", "SnapshotBag", "SnapshotModel"]
