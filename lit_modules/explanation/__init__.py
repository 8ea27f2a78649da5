"""Explanation: context vs object attribution ("Lost in Context", ICVGIP 2024): the volume metrics (``volume``)."""

from lit_modules.explanation.volume import ContextVolume, VariantAccuracy

__all__ = ["ContextVolume", "VariantAccuracy"]
