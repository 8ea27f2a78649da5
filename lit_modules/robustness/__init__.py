"""Robustness: attacks in pixel space (``attacks``), adversarial training with the clean, FGSM-AT, PGD-AT and
Gray-box Adversarial Training regimes (``adversarial_training``), gray-box evaluation (``gray_box``), and the
severity of fooling: class hierarchies (``hierarchy``), the :class:`FoolingSeverity` metric (``severity``) and
the :class:`SeverityReport` stage (``severity_report``); universal adversarial perturbations learned on Data
Impressions or real images (:class:`UniversalPerturbation`, ``universal_perturbation``; math in ``uap_objective``)."""

from lit_modules.robustness.adversarial_training import AdversarialTrainer, SnapshotBag, SnapshotModel
from lit_modules.robustness.gray_box import GrayBoxEvaluation
from lit_modules.robustness.hierarchy import ClassHierarchy, load_hierarchy
from lit_modules.robustness.severity import FoolingSeverity
from lit_modules.robustness.severity_report import SeverityReport
from lit_modules.robustness.universal_perturbation import UniversalPerturbation

__all__ = ["AdversarialTrainer", "ClassHierarchy", "FoolingSeverity", "GrayBoxEvaluation", "SeverityReport",
           "SnapshotBag", "SnapshotModel", "UniversalPerturbation", "load_hierarchy"]
