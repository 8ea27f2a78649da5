"""Robustness: attacks in pixel space and their registry (``attacks``), adversarial training
(:class:`AdversarialTraining` with the :class:`CleanTraining`, :class:`FGSMTraining`, :class:`PGDTraining` and
:class:`FastTraining` adversaries) and Gray-box Adversarial Training (:class:`GrayBoxAdversarialTraining`;
``AdversarialTrainer`` is the old name, one release) in ``adversarial_training``, gray-box evaluation
(``gray_box``), and the severity of fooling: class hierarchies (``hierarchy``), the :class:`FoolingSeverity`
metric (``severity``) and the :class:`SeverityReport` stage (``severity_report``); universal adversarial
perturbations learned on Data Impressions or real images, or data-free (GD-UAP) (:class:`UniversalPerturbation`,
``universal_perturbation``; math in ``uap_objective``)."""

from lit_modules.robustness.adversarial_training import (
    AdversarialTrainer,
    AdversarialTraining,
    CleanTraining,
    FastTraining,
    FGSMTraining,
    GrayBoxAdversarialTraining,
    PGDTraining,
    SnapshotBag,
    SnapshotModel,
    TrainingAdversary,
)
from lit_modules.robustness.gray_box import GrayBoxEvaluation
from lit_modules.robustness.hierarchy import ClassHierarchy, load_hierarchy
from lit_modules.robustness.severity import FoolingSeverity
from lit_modules.robustness.severity_report import SeverityReport
from lit_modules.robustness.universal_perturbation import UniversalPerturbation

__all__ = ["AdversarialTrainer", "AdversarialTraining", "ClassHierarchy", "CleanTraining", "FGSMTraining",
           "FastTraining", "FoolingSeverity", "GrayBoxAdversarialTraining", "GrayBoxEvaluation", "PGDTraining",
           "SeverityReport", "SnapshotBag", "SnapshotModel", "TrainingAdversary", "UniversalPerturbation",
           "load_hierarchy"]
