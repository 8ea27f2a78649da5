"""Gradient leakage: DLG / iDLG (:class:`LeakageAttack` in ``idlg``), the attack math in
``gradient_leakage`` and the batched L-BFGS / Adam optimisers in ``batched_optim``."""

from lit_modules.leakage.idlg import LeakageAttack

__all__ = ["LeakageAttack"]
