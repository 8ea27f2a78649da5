"""Explanation: context vs object attribution ("Lost in Context", Adhikari, Kumar, Mopuri, Pachamuthu, ICVGIP 2024):
the volume metrics (``volume``), batched attribution methods (``attribution``) and the study stage
(``context_study``); the data with its variants is :mod:`datamodules.context_variants`."""

from lit_modules.explanation.attribution import ATTRIBUTIONS, attribute, find_layer
from lit_modules.explanation.context_study import ContextAttributionStudy
from lit_modules.explanation.volume import ContextVolume, VariantAccuracy, attribution_volumes, normalize_attribution

__all__ = ["ATTRIBUTIONS", "ContextAttributionStudy", "ContextVolume", "VariantAccuracy", "attribute",
           "attribution_volumes", "find_layer", "normalize_attribution"]
