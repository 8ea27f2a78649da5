"""LightningModules (training systems), one per method; networks live in :mod:`lit_modules.nets`."""

from lit_modules.adversarial_kd import AdversarialKD
from lit_modules.classifier import ClassifierModule
from lit_modules.condensation import DatasetCondensation
from lit_modules.teacher import FrozenTeacher, TeacherLoadError, load_teacher

__all__ = ["AdversarialKD", "ClassifierModule", "DatasetCondensation", "FrozenTeacher", "TeacherLoadError", "load_teacher"]
