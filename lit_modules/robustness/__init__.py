"""Robustness: attacks in pixel space (``attacks``), adversarial training with the clean, FGSM-AT, PGD-AT and
Gray-box Adversarial Training regimes (``adversarial_training``), and gray-box evaluation (``gray_box``)."""
