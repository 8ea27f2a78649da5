"""Errors of the data layer (the base class lives in :mod:`cvlab.errors`)."""

from __future__ import annotations

from cvlab.errors import CvlabError

__all__ = ["CvlabError", "DatasetNotFoundError"]


class DatasetNotFoundError(CvlabError, FileNotFoundError):
    """A dataset is not on disk and may not be downloaded."""
