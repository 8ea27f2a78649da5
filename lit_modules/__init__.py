"""Training systems, one package per family; what every family shares stays at this level.

- shared: :mod:`lit_modules.classifier` (supervised training of any network), :mod:`lit_modules.teacher`
  (any network plus weights plus its input contract, frozen), :mod:`lit_modules.optim`;
- :mod:`lit_modules.nets`: plain ``nn.Module`` networks (the zoo), reachable by name or class path;
- families: :mod:`lit_modules.distillation` (ZSKD, transfer sets, LRA), :mod:`lit_modules.condensation`
  (DC), :mod:`lit_modules.leakage` (DLG / iDLG), :mod:`lit_modules.robustness` (attacks, adversarial
  training, GAT, gray-box evaluation), :mod:`lit_modules.generation` (CBGAN).
"""

from lit_modules.classifier import ClassifierModule
from lit_modules.condensation import DatasetCondensation
from lit_modules.distillation import LRA, AdversarialKD, DataImpressionSynthesizer, KDStudent
from lit_modules.generation import ClassBalancingGAN
from lit_modules.leakage import LeakageAttack
from lit_modules.robustness import AdversarialTrainer, AdversarialTraining, GrayBoxAdversarialTraining
from lit_modules.teacher import FrozenTeacher, TeacherLoadError, load_teacher

__all__ = [
    "LRA",
    "AdversarialKD",
    "AdversarialTrainer",
    "AdversarialTraining",
    "ClassBalancingGAN",
    "ClassifierModule",
    "DataImpressionSynthesizer",
    "DatasetCondensation",
    "FrozenTeacher",
    "GrayBoxAdversarialTraining",
    "KDStudent",
    "LeakageAttack",
    "TeacherLoadError",
    "load_teacher",
]
